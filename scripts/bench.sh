#!/usr/bin/env bash
# `make bench`: the worker beside its limits on the real broker, then the client, scrape and
# HTTP benchmarks (about 20 minutes on 2 cores).
# Starts the local broker if none answers and stops it at exit only if it started it; then
# runs scripts/bench.py, which prints progress and a table, writes bench-out/results.json
# and regenerates the results section of docs/benchmarks.md. Extra arguments go to bench.py
# (e.g. `scripts/bench.sh --only scoring`; `--help` lists them).
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
.venv/bin/python scripts/bench.py --write-docs "$@"
# The rest of the table (each writes its own section of docs/benchmarks.md or bench-out/):
echo "== Kafka clients side by side (scripts/bench_clients.py)"
.venv/bin/python scripts/bench_clients.py --write-docs
echo "== /metrics under 200 concurrent scrapes (scripts/bench_scrape.py)"
.venv/bin/python scripts/bench_scrape.py --rounds 3 | tee bench-out/scrape.txt
echo "== anomaly-serve vs the tutorial's Flask + Keras path (scripts/bench_serve.py)"
command -v wrk >/dev/null || {
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends wrk >/dev/null
}
.venv/bin/python scripts/bench_serve.py --out bench-out/serve.json --markdown bench-out/serve.md
