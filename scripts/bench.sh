#!/usr/bin/env bash
# The benchmark command of the README: set the machine up (idempotent, scripts/setup.sh), then run
# the harness (bench/) from the repository root with the venv's Python. Arguments go to the harness:
#   scripts/bench.sh                 # the full sizes of the issue (takes a while)
#   scripts/bench.sh --smoke         # tiny sizes, checks that the harness works (< 2 min)
#   scripts/bench.sh --only overhead,data --runs 50 --out /tmp/b.json
# It prints a table of ratios at the end and writes bench/results/latest.json (+ .png).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python -m bench "$@"
