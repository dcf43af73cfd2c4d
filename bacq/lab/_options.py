"""The chaos run's options and fault kinds: what ``bacq lab chaos`` accepts, kept apart from the
run itself so that building the ``bacq`` parser (``bacq --help``) imports nothing more. Touches
nothing.
"""

from __future__ import annotations

import argparse

__all__ = ["FAULT_KINDS", "add_chaos_arguments"]

FAULT_KINDS = (
    "cut-worker",
    "cut-nats",
    "cut-requester",
    "cut-verifier",
    "kill-worker",
    "kill-nats",
    "kill-requester",
    "kill-verifier",
)


def add_chaos_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=2000, help="jobs to submit (default 2000)")
    parser.add_argument("--seed", type=int, default=1, help="the faults' random seed (default 1)")
    parser.add_argument(
        "--parallel", type=int, default=40, help="jobs in flight at once (default 40)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="submit at most this many jobs a second (default 0: as fast as they finish)",
    )
    parser.add_argument(
        "--fault-every",
        type=float,
        default=10.0,
        help="mean seconds between the end of one fault and the next (default 10)",
    )
    parser.add_argument(
        "--hold", type=float, default=12.0, help="longest a fault lasts, seconds (default 12)"
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help=f"the kinds to inject, comma-separated (default all: {','.join(FAULT_KINDS)})",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds the whole run may take"
    )
    parser.add_argument("--output", choices=["table", "json"], default="table")
