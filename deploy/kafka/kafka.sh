#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, broker+controller) on loopback, for tests and the demo.
#
#   deploy/kafka/kafka.sh fetch    resolve Kafka's jars from Maven Central into $KAFKA_HOME/libs
#   deploy/kafka/kafka.sh start    format once, start in the background, wait until a metadata
#                                  request answers, print how long that took
#   deploy/kafka/kafka.sh stop     SIGTERM the PID we started, SIGKILL after a grace period
#   deploy/kafka/kafka.sh status   exit 0 when our broker answers metadata requests
#
# Environment: KAFKA_PORT (39092), KAFKA_CONTROLLER_PORT (39093), KAFKA_HOST (127.0.0.1),
# KAFKA_HOME (<repo>/.cache/kafka), KAFKA_START_TIMEOUT seconds (60), KAFKA_HEAP (-Xms512m -Xmx1g).
# Only the PID recorded in $KAFKA_HOME/broker.pid is ever signalled.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
KAFKA_HOST="${KAFKA_HOST:-127.0.0.1}"
KAFKA_PORT="${KAFKA_PORT:-39092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-39093}"
KAFKA_HOME="${KAFKA_HOME:-$repo/.cache/kafka}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
KAFKA_HEAP="${KAFKA_HEAP:--Xms512m -Xmx1g}"
libs="$KAFKA_HOME/libs"
data="$KAFKA_HOME/data-$KAFKA_PORT"
pidfile="$KAFKA_HOME/broker-$KAFKA_PORT.pid"
logfile="$KAFKA_HOME/broker-$KAFKA_PORT.log"
props="$KAFKA_HOME/server-$KAFKA_PORT.properties"

log() { printf '[kafka.sh] %s\n' "$*" >&2; }

fetch() {
  if [ -f "$libs/.complete" ]; then return 0; fi
  command -v mvn >/dev/null || { log "mvn not found: install Maven (apt-get install maven)"; exit 1; }
  log "resolving Kafka jars from Maven Central into $libs"
  mkdir -p "$libs"
  mvn -B -q -f "$here/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$libs"
  ls "$libs"/kafka_2.13-*.jar >/dev/null
  touch "$libs/.complete"
}

# KAFKA_SASL_PLAIN_USERS="user:password,..." turns the client listener into SASL_PLAINTEXT
# with the PLAIN mechanism (for tests of authentication failures); the broker talks to
# itself as user "broker" with KAFKA_SASL_BROKER_PASSWORD.
KAFKA_SASL_PLAIN_USERS="${KAFKA_SASL_PLAIN_USERS:-}"
KAFKA_SASL_BROKER_PASSWORD="${KAFKA_SASL_BROKER_PASSWORD:-broker-secret}"
proto=PLAINTEXT
[ -n "$KAFKA_SASL_PLAIN_USERS" ] && proto=SASL_PLAINTEXT

write_props() {
  mkdir -p "$data"
  cat >"$props" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
listeners=$proto://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=$proto://$KAFKA_HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=$proto:$proto,CONTROLLER:PLAINTEXT
inter.broker.listener.name=$proto
log.dirs=$data/logs
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
transaction.abort.timed.out.transaction.cleanup.interval.ms=2000
log.retention.hours=6
PROPS
  if [ -n "$KAFKA_SASL_PLAIN_USERS" ]; then
    local users="" pair
    IFS=',' read -ra pairs <<<"$KAFKA_SASL_PLAIN_USERS"
    for pair in "${pairs[@]}"; do users+=" user_${pair%%:*}=\"${pair#*:}\""; done
    cat >>"$props" <<PROPS
sasl.enabled.mechanisms=PLAIN
sasl.mechanism.inter.broker.protocol=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="broker" password="$KAFKA_SASL_BROKER_PASSWORD" user_broker="$KAFKA_SASL_BROKER_PASSWORD"$users;
PROPS
  fi
}

running_pid() {
  [ -f "$pidfile" ] || return 1
  local pid; pid="$(cat "$pidfile")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

answers() {
  # Ready means a metadata request answers, not just an open port.
  command -v kcat >/dev/null || { log "kcat not found: apt-get install kcat"; exit 1; }
  local auth=()
  if [ -n "$KAFKA_SASL_PLAIN_USERS" ]; then
    auth=(-X security.protocol=SASL_PLAINTEXT -X sasl.mechanisms=PLAIN
          -X sasl.username=broker -X "sasl.password=$KAFKA_SASL_BROKER_PASSWORD")
  fi
  kcat -L -b "$KAFKA_HOST:$KAFKA_PORT" -m 2 "${auth[@]}" >/dev/null 2>&1
}

start() {
  fetch
  if pid="$(running_pid)"; then
    if answers; then log "already running (pid $pid) on $KAFKA_HOST:$KAFKA_PORT"; return 0; fi
  fi
  write_props
  local cp="$libs/*"
  if [ ! -f "$data/.formatted" ]; then
    local cluster_id
    # A base64url id may begin with '-', which the storage tool's argument parser then
    # takes for an option ("--cluster-id: expected one argument": 1 start in 64 failed).
    # Kafka's own Uuid.randomUuid() redraws such ids; so do we.
    cluster_id="-"
    while [ "${cluster_id:0:1}" = "-" ]; do
      cluster_id="$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
    done
    java -cp "$cp" -Dlog4j2.configurationFile="$here/log4j2.properties" \
      kafka.tools.StorageTool format -t "$cluster_id" -c "$props" --ignore-formatted \
      >"$logfile" 2>&1 || { log "format failed:"; cat "$logfile" >&2; exit 1; }
    touch "$data/.formatted"
  fi
  local t0; t0="$(date +%s.%N)"
  # shellcheck disable=SC2086  # KAFKA_HEAP holds several JVM flags on purpose
  nohup java $KAFKA_HEAP -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$here/log4j2.properties" \
    -cp "$cp" kafka.Kafka "$props" >>"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
  local deadline=$(( $(date +%s) + KAFKA_START_TIMEOUT ))
  until answers; do
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      log "broker exited during start; its log:"; tail -n 80 "$logfile" >&2; exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "broker not ready after ${KAFKA_START_TIMEOUT}s; its log:"; tail -n 80 "$logfile" >&2
      stop; exit 1
    fi
    sleep 0.2
  done
  local took; took="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')"
  log "broker ready on $KAFKA_HOST:$KAFKA_PORT in ${took}s (pid $(cat "$pidfile"), log $logfile)"
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then rm -f "$pidfile"; log "not running"; return 0; fi
  kill -TERM "$pid"
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "still alive after 15s, SIGKILL $pid"; kill -KILL "$pid"; fi
  rm -f "$pidfile"
  log "stopped (pid $pid)"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) running_pid >/dev/null && answers ;;
  *) echo "usage: $0 fetch|start|stop|status" >&2; exit 2 ;;
esac
