#!/usr/bin/env bash
# The test command of the README and of CI: set the machine up (idempotent), then lint, type-check
# and run every test against real nats-server, dockerd and kubo.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
. .venv/bin/activate
echo "== ruff check"
ruff check .
echo "== mypy --strict bacq"
mypy --strict bacq
echo "== pytest"
pytest "$@"
