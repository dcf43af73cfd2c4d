"""``bacq lab up|status|down`` (also ``python -m bacq.lab``): the lab from a terminal.

Touches what ``bacq.lab.core.Lab`` touches; prints the client's environment lines on stdout and
progress on stderr. ``add_arguments`` and ``run`` let the ``bacq`` command mount the same options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bacq.errors import BacqError, ConfigError

__all__ = ["add_arguments", "main", "run"]

STATE_DIR_HELP = "the lab's directory (default $BACQ_LAB_DIR or /var/lib/bacq-lab, /bacqlab<INDEX>)"


def add_arguments(
    parser: argparse.ArgumentParser, common: argparse.ArgumentParser | None = None
) -> None:
    """The ``up``/``status``/``down`` subcommands; ``common``: parent options of each."""
    actions: Any = parser.add_subparsers(
        dest="lab_action", required=True, metavar="up|status|down", parser_class=type(parser)
    )
    parents = [common] if common is not None else []
    up = actions.add_parser(
        "up", help="start the lab (or say it runs) and print its env lines", parents=parents
    )
    up.add_argument("--workers", type=int, default=10, help="worker hosts (default 10)")
    up.add_argument(
        "--requesters",
        type=int,
        default=1,
        help="requester hosts; beyond the first, standbys for the lease (default 1)",
    )
    up.add_argument(
        "--verifiers", type=int, default=1, help="verifier hosts, as requesters (default 1)"
    )
    status = actions.add_parser(
        "status", help="each host: namespace, processes, ready", parents=parents
    )
    status.add_argument("--output", choices=["table", "json"], default="table")
    down = actions.add_parser(
        "down", help="remove every namespace, link, process, container, dir", parents=parents
    )
    for sub in (up, status, down):
        sub.add_argument(
            "--index",
            type=int,
            default=0,
            help="which lab: bridge bacqlab<INDEX>, addresses 10.213.<INDEX>.0/24 (default 0)",
        )
        sub.add_argument("--state-dir", help=STATE_DIR_HELP)


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed ``lab`` command; 0 when done (``status``: when every host is ok).
    Errors are raised (``bacq`` reports them; ``main`` prints them)."""
    from bacq.lab.core import Lab

    state_dir = Path(args.state_dir) if args.state_dir else None
    if args.lab_action == "up":
        lab = Lab(
            index=args.index,
            workers=args.workers,
            requesters=args.requesters,
            verifiers=args.verifiers,
            state_dir=state_dir,
        )
        print(
            f"bringing the lab up: 3 nats, {args.requesters} requester, {args.verifiers} "
            f"verifier, a client kubo, {args.workers} workers on bridge {lab.bridge} …",
            file=sys.stderr,
        )
        lab.up()
        print(
            f"lab is up; state and logs in {lab.state_dir}; the client's NATS password is in "
            f"{lab.password_file('client')}. Paste these lines:",
            file=sys.stderr,
        )
        print(lab.env_lines(), flush=True)
        return 0
    lab = Lab(index=args.index, state_dir=state_dir)
    if args.lab_action == "status":
        report = lab.status()
        if args.output == "json":
            print(json.dumps(report, indent=2))
        elif not report["up"]:
            print(f"no lab in {lab.state_dir}")
        else:
            print(f"{'host':<14}{'role':<11}{'address':<15}{'procs':>6}  ok")
            for row in report["hosts"]:
                print(
                    f"{row['host']:<14}{row['role']:<11}{row['address']:<15}"
                    f"{row['processes']:>6}  {'yes' if row['ok'] else 'NO'}"
                )
        return 0 if report["ok"] else 1
    removed = lab.down()
    print(
        f"lab {lab.prefix} is down: {len(removed['namespaces'])} namespaces, "
        f"{len(removed['processes'])} processes, {len(removed['containers'])} containers "
        "removed",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bacq.lab", description=__doc__)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ConfigError as exc:  # not root, a bad count: usage
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BacqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
