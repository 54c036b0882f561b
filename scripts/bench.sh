#!/usr/bin/env bash
# `make bench`: the worker beside its limits on the real broker, then the client (with the
# quixstreams and hand-written peers, per-client latency and scale-out), scrape and HTTP
# benchmarks (about 20-25 minutes on 2 quiet cores).
# Starts the local broker if none answers and stops it at exit only if it started it; then
# runs scripts/bench.py, which prints progress and a table, writes bench-out/results.json
# and regenerates the results section of docs/benchmarks.md. Extra arguments go to bench.py
# (e.g. `scripts/bench.sh --only scoring`; `--help` lists them).
# Subsets: BENCH_PARTS (default "main clients scrape serve") picks the parts;
# BENCH_CLIENTS_ARGS goes to scripts/bench_clients.py (its --help lists the row keys), e.g.
#   BENCH_PARTS=clients BENCH_CLIENTS_ARGS="--skip latency --repeats 2" scripts/bench.sh
#   BENCH_PARTS=clients BENCH_CLIENTS_ARGS="--only quix,hand,ck_alo,ck_eos" scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
started=0
cleanup() { if [ "$started" = 1 ]; then deploy/kafka/kafka.sh stop || true; fi; }
trap cleanup EXIT
if ! deploy/kafka/kafka.sh status >/dev/null 2>&1; then
  deploy/kafka/kafka.sh start
  started=1
fi
mkdir -p bench-out
export KAFKA_BOOTSTRAP="${KAFKA_BOOTSTRAP:-127.0.0.1:${KAFKA_PORT:-39092}}"
export BENCH_COMMAND="${BENCH_COMMAND:-make bench}"
parts=" ${BENCH_PARTS:-main clients scrape joins serve} "
want() { [[ "$parts" == *" $1 "* ]]; }
if want main; then
  .venv/bin/python scripts/bench.py --write-docs "$@"
fi
# The rest of the table (each writes its own section of docs/benchmarks.md or bench-out/):
if want clients; then
  echo "== Kafka clients side by side, peers, latency per client (scripts/bench_clients.py)"
  # shellcheck disable=SC2086  # word splitting of the extra arguments is intended
  .venv/bin/python scripts/bench_clients.py --write-docs ${BENCH_CLIENTS_ARGS:-}
fi
if want scrape; then
  echo "== /metrics under 200 concurrent scrapes (scripts/bench_scrape.py)"
  .venv/bin/python scripts/bench_scrape.py --rounds 3 | tee bench-out/scrape.txt
fi
if want joins; then
  echo "== group joins per start, plain kafka-python vs the adapter (scripts/bench_joins.py)"
  .venv/bin/python scripts/bench_joins.py --starts 10 | tee bench-out/joins.txt
fi
if want serve; then
  echo "== anomaly-serve vs the tutorial's Flask + Keras path (scripts/bench_serve.py)"
  command -v wrk >/dev/null || {
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends wrk >/dev/null
  }
  .venv/bin/python scripts/bench_serve.py --out bench-out/serve.json --markdown bench-out/serve.md
fi
