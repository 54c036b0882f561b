#!/usr/bin/env bash
# `make bench`: the worker beside its limits on the real broker, in one run (< 10 minutes).
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
