#!/usr/bin/env bash
# The demo command of the README: set the machine up (idempotent), start a devstack with 3 workers,
# run the reference report's job on it, show what the user sees, fetch the results, and stop.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
. .venv/bin/activate

work=$(mktemp -d -t bacq-demo-XXXXXX)
bacq devstack --workers 3 --env-file "$work/env" >"$work/devstack.out" 2>&1 &
stack=$!
trap 'kill -TERM $stack 2>/dev/null; wait $stack 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 120); do
    [ -s "$work/env" ] && break
    kill -0 $stack 2>/dev/null || { cat "$work/devstack.out"; exit 1; }
    sleep 0.5
done
[ -s "$work/env" ] || { echo "devstack did not start:"; cat "$work/devstack.out"; exit 1; }
. "$work/env"
cat "$work/env"

cd "$work"
set -x
echo "hello from bacq" > file.txt
cid=$(bacq ipfs add file.txt)
bacq run -v "$cid:/file.txt" -o apples:/output_folder --concurrency 3 --confidence 2 \
    bacq-test/debian:bookworm -- bash -c 'cat /file.txt > /output_folder/file.txt'
bacq list
job=$(bacq list -n 1 --output json | python -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])')
bacq describe "$job"
bacq get "$job" --output-dir out/
cat out/apples/file.txt
{ set +x; } 2>/dev/null
echo "demo done: out/stdout, out/stderr, out/exitCode and out/apples/file.txt came back through IPFS"
