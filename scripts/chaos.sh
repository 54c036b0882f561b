#!/usr/bin/env bash
# `make chaos`: the worker under faults (issue 9), against a private broker the suite starts
# and stops itself (own ports, own data dir; the shared broker on 39092 is never touched).
# Arguments go to scripts/chaos.py (`--help` lists them), e.g.
#   scripts/chaos.sh --scenarios kill9,zombie --modes exactly_once --readings 20000
#   scripts/chaos.sh --runs 3 --write-docs          (the "done when" check of issue 9)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec .venv/bin/python scripts/chaos.py "$@"
