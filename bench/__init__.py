"""bacq's benchmark harness: ratios of bacq against raw Docker and kubo, measured in one run.

Run it as ``scripts/bench.sh`` (or ``python -m bench``) from the repository root. It starts its
own devstacks (nats-server, kubo, requester, verifier, workers as local processes), runs
containers through the local Docker daemon and writes a JSON file and a PNG; it touches nothing
else. See ``bench.run`` for the sections and flags.
"""
