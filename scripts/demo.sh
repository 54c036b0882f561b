#!/usr/bin/env bash
# `make demo`: the whole job end to end on a simulated fleet; stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
started=0
cleanup() { if [ "$started" = 1 ]; then deploy/kafka/kafka.sh stop || true; fi; }
trap cleanup EXIT
if ! deploy/kafka/kafka.sh status; then
  deploy/kafka/kafka.sh start
  started=1
fi
.venv/bin/python scripts/demo.py "$@"
