"""``bacq lab up|status|down|cut|heal|netem|kill|start|chaos`` (also ``python -m bacq.lab``).

The lab from a terminal: bring it up, look at it, inject faults, run the chaos run, take it down.

Touches what ``bacq.lab.core.Lab`` touches; prints the client's environment lines on stdout and
progress on stderr. ``add_arguments`` and ``run`` let the ``bacq`` command mount the same options.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bacq.errors import BacqError, ConfigError
from bacq.lab._options import add_chaos_arguments

EXECUTORS = ("docker", "noop")
CUT_ONLY = ("ipfs",)

__all__ = ["add_arguments", "main", "run"]

STATE_DIR_HELP = "the lab's directory (default $BACQ_LAB_DIR or /var/lib/bacq-lab, /bacqlab<INDEX>)"


def add_arguments(
    parser: argparse.ArgumentParser, common: argparse.ArgumentParser | None = None
) -> None:
    """The lab's subcommands; ``common``: parent options of each."""
    actions: Any = parser.add_subparsers(
        dest="lab_action",
        required=True,
        metavar="up|status|down|cut|heal|netem|kill|start|chaos",
        parser_class=type(parser),
    )
    parents = [common] if common is not None else []
    up = actions.add_parser(
        "up", help="start the lab (or say it runs) and print its env lines", parents=parents
    )
    up.add_argument("--workers", type=int, default=10, help="worker hosts (default 10)")
    up.add_argument(
        "--requesters",
        type=int,
        default=2,
        help="requester hosts; beyond the first, standbys for the lease (default 2)",
    )
    up.add_argument(
        "--verifiers", type=int, default=2, help="verifier hosts, as requesters (default 2)"
    )
    up.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="docker",
        help="what the workers run: docker, or noop (no container; for the chaos run)",
    )
    up.add_argument(
        "--fetch-timeout",
        type=float,
        default=60.0,
        help="seconds a worker waits for a job's inputs from IPFS (default 60)",
    )
    status = actions.add_parser(
        "status", help="each host: namespace, processes, ready", parents=parents
    )
    status.add_argument("--output", choices=["table", "json"], default="table")
    down = actions.add_parser(
        "down", help="remove every namespace, link, process, container, dir", parents=parents
    )
    cut = actions.add_parser(
        "cut", help="cut a host off the bridge (or --only ipfs: its kubo's swarm)", parents=parents
    )
    cut.add_argument("host", help="a host: nats-1, requester-1, verifier-1, ipfs, w1, …")
    cut.add_argument(
        "--only", choices=sorted(CUT_ONLY), help="cut only this traffic (ipfs: port 4001)"
    )
    heal = actions.add_parser("heal", help="undo cut and netem on a host", parents=parents)
    heal.add_argument("host")
    netem = actions.add_parser(
        "netem", help="packet loss and latency on a host (tc netem)", parents=parents
    )
    netem.add_argument("host")
    netem.add_argument("--loss", default="0", help="packets lost each way, e.g. 10%% (default 0)")
    netem.add_argument("--delay", default="0", help="added each way, e.g. 100ms (default 0)")
    netem.add_argument("--clear", action="store_true", help="remove the loss and latency")
    kill = actions.add_parser("kill", help="kill -9 a host's service", parents=parents)
    kill.add_argument("host")
    kill.add_argument(
        "service", nargs="?", help="nats, requester, verifier, worker or kubo (default: the main)"
    )
    start = actions.add_parser(
        "start", help="start a killed service again, as up did", parents=parents
    )
    start.add_argument("host")
    start.add_argument("service", nargs="?")
    chaos = actions.add_parser(
        "chaos",
        help="submit jobs while hosts are cut off and services killed; check every one",
        parents=parents,
    )
    add_chaos_arguments(chaos)
    for sub in (up, status, down, cut, heal, netem, kill, start, chaos):
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
    from pathlib import Path

    from bacq.lab.core import Lab

    state_dir = Path(args.state_dir) if args.state_dir else None
    if args.lab_action == "up":
        lab = Lab(
            index=args.index,
            workers=args.workers,
            requesters=args.requesters,
            verifiers=args.verifiers,
            state_dir=state_dir,
            executor=args.executor,
            fetch_timeout=args.fetch_timeout,
        )
        print(
            f"bringing the lab up: 3 nats, {args.requesters} requesters, {args.verifiers} "
            f"verifiers, a client kubo, {args.workers} workers ({args.executor}) on bridge "
            f"{lab.bridge} …",
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
    if args.lab_action == "chaos":
        from bacq.lab.chaos import run_chaos

        return run_chaos(lab, args)
    if args.lab_action in ("cut", "heal", "netem", "kill", "start"):
        return _fault(lab, args)
    if args.lab_action == "status":
        report = lab.status()
        if args.output == "json":
            print(json.dumps(report, indent=2))
        elif not report["up"]:
            print(f"no lab in {lab.state_dir}")
        else:
            print(f"{'host':<14}{'role':<11}{'address':<15}{'procs':>6}  ok   faults")
            for row in report["hosts"]:
                print(
                    f"{row['host']:<14}{row['role']:<11}{row['address']:<15}"
                    f"{row['processes']:>6}  {'yes' if row['ok'] else 'NO ':<4} "
                    f"{', '.join(row['faults']) or '-'}"
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


def _amount(text: str, unit: str, flag: str) -> float:
    """``10%`` / ``10`` → 10.0 (``unit`` ``%``); ``100ms`` / ``100`` → 100.0 (``unit`` ``ms``)."""
    raw = text.strip().removesuffix(unit)
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(
            f"{flag} must be a number{' of ' + unit if unit else ''}, e.g. "
            f"{'10%' if unit == '%' else '100ms'}; not {text!r}"
        ) from None


def _fault(lab: Any, args: argparse.Namespace) -> int:
    action, host = args.lab_action, args.host
    if action == "cut":
        lab.cut(host, only=args.only)
        only = f" ({args.only} only)" if args.only else ""
        print(f"{host} is cut off{only}", file=sys.stderr)
    elif action == "heal":
        lab.heal(host)
        print(f"{host} is healed", file=sys.stderr)
    elif action == "netem":
        if args.clear:
            lab.heal(host)
            print(f"{host}: loss and latency removed", file=sys.stderr)
            return 0
        loss = _amount(args.loss, "%", "--loss")
        delay = _amount(args.delay, "ms", "--delay")
        how = lab.netem(host, loss=loss, delay_ms=delay)
        print(f"{host}: loss {loss:g}%, delay {delay:g}ms each way ({how})", file=sys.stderr)
    elif action == "kill":
        pid = lab.kill(host, args.service)
        what = args.service or "its service"
        print(
            f"{host}: {what} killed (pid {pid})" if pid else f"{host}: {what} was not running",
            file=sys.stderr,
        )
    else:
        pid = lab.start(host, args.service)
        print(f"{host}: {args.service or 'its service'} runs (pid {pid})", file=sys.stderr)
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
