#!/usr/bin/env bash
# Lint, type-check and run every test against a real local Kafka broker. Starts the broker
# if none answers and stops it afterwards (also when tests fail); stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
started=0
cleanup() { if [ "$started" = 1 ]; then deploy/kafka/kafka.sh stop || true; fi; }
trap cleanup EXIT
if ! deploy/kafka/kafka.sh status; then
  deploy/kafka/kafka.sh start
  started=1
fi
# Separate commands: under `set -e` a failure inside `a && b` does not stop the script.
echo "== ruff"
$BIN/ruff check .
$BIN/ruff format --check .
echo "== mypy"; $BIN/mypy
echo "== pytest"
$BIN/pytest -v -rs --durations=15 "$@"
