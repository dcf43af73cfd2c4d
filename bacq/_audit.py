"""Audit commands of the CLI: ``bacq history``, ``bacq events`` and ``bacq cancel``.

Touches NATS through ``bacq.client`` and prints to the terminal; ``bacq.cli`` registers the parsers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from typing import Any

from rich.console import Console
from rich.table import Table

from bacq.client import Client
from bacq.errors import ConfigError
from bacq.events import Event, verify_chain

__all__ = ["add_parsers", "parse_since"]

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class _UsageError(ConfigError):
    """A malformed argument: the CLI exits 2."""


def parse_since(text: str) -> dt.datetime:
    """``10m``, ``2h``, ``1d`` ago, or an ISO 8601 time (UTC when no zone is given)."""
    match = _RELATIVE.match(text.strip())
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise _UsageError(
            f"--since {text!r} is not a time; write 10m, 2h, 1d or 2026-11-24T10:00:00Z"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _what(event: Event) -> str:
    if event.kind == "execution":
        return f"{event.node_id}: {event.state}"
    if event.kind == "submitted":
        return f"job submitted ({event.spec.image if event.spec else '?'})"
    return f"job: {event.state}"


def _why(event: Event) -> str:
    parts = [p for p in (event.error or event.reason,) if p]
    if event.result_cid and event.kind == "job":
        parts.append(f"result {event.result_cid}")
    return "; ".join(parts)


def _event_json(event: Event, stream_seq: int | None = None) -> dict[str, Any]:
    data = event.model_dump(mode="json", exclude_none=True)
    if stream_seq is not None:
        data["stream_seq"] = stream_seq
    return data


async def cmd_history(args: argparse.Namespace, client: Client, out: Console) -> int:
    events = await client.history(args.job_id)
    flaw = verify_chain(events) if args.verify else None
    if args.output == "json":
        print(json.dumps([_event_json(e) for e in events], indent=2))
    else:
        table = Table(box=None, pad_edge=False)
        for column in ("SEQ", "TIME (UTC)", "WHO", "WHAT", "WHY"):
            table.add_column(column, overflow="fold")
        for event in events:
            table.add_row(
                str(event.seq),
                event.at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                event.actor,
                _what(event),
                _why(event),
            )
        out.print(table)
    if args.verify:
        if flaw is not None:
            out.print(f"[red]history of {args.job_id} does not verify:[/] {flaw}")
            return 1
        out.print(
            f"[green]history verified:[/] {len(events)} events, each chained to the one before it"
        )
    return 0


async def cmd_events(args: argparse.Namespace, client: Client, out: Console) -> int:
    since = parse_since(args.since) if args.since else None
    async for stream_seq, event in client.events(
        from_seq=args.from_seq, since=since, follow=args.follow
    ):
        if args.output == "json":
            print(json.dumps(_event_json(event, stream_seq)), flush=True)
        else:
            out.print(
                f"{stream_seq:>7} {event.at.strftime('%Y-%m-%d %H:%M:%S')} {event.job_id} "
                f"#{event.seq} {event.actor}: {_what(event)}"
                + (f" — {_why(event)}" if _why(event) else "")
            )
    return 0


async def cmd_cancel(args: argparse.Namespace, client: Client, out: Console) -> int:
    reply = await client.cancel(args.job_id)
    stopped = ", ".join(reply.stopped) or "no worker was running it"
    out.print(f"cancelled {args.job_id} (stopped on: {stopped})")
    return 0


def add_parsers(sub: Any, connection_flags: Any) -> None:
    """Register history, events and cancel on the ``bacq`` parser's subcommands."""
    history = sub.add_parser("history", help="a job's full event history, replayed from JetStream")
    history.add_argument("job_id", metavar="JOB_ID")
    history.add_argument(
        "--verify",
        action="store_true",
        help="check the hash chain; names the first broken link (exit 1)",
    )
    history.add_argument("--output", choices=["table", "json"], default="table")
    connection_flags(history)
    history.set_defaults(client_func=cmd_history)

    events = sub.add_parser("events", help="every job's events from a point on, optionally live")
    start = events.add_mutually_exclusive_group()
    start.add_argument("--since", metavar="TIME", help="10m, 2h, 1d or an ISO 8601 time")
    start.add_argument("--from-seq", type=int, metavar="N", help="from stream sequence N")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument(
        "--output", choices=["table", "json"], default="table", help="json: one object per line"
    )
    connection_flags(events)
    events.set_defaults(client_func=cmd_events)

    cancel = sub.add_parser("cancel", help="cancel a job: stop its containers, free the workers")
    cancel.add_argument("job_id", metavar="JOB_ID")
    connection_flags(cancel)
    cancel.set_defaults(client_func=cmd_cancel)
