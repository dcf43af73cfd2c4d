"""Audit commands of the CLI: ``bacq history``, ``bacq events`` and ``bacq cancel``.

Touches NATS through ``bacq.client`` and prints to the terminal; ``bacq.cli`` registers the parsers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bacq import subjects
from bacq.client import Client
from bacq.errors import ConfigError
from bacq.events import Event, HistoryCheck, verify_history
from bacq.signing import (
    KEYS_BUCKET,
    KEYS_ENTRY,
    REQUESTER_KEY_ENV,
    fetch_requester_keys,
    parse_public_keys,
)

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


async def _trusted_keys(args: argparse.Namespace, client: Client) -> tuple[list[str], str]:
    """The requester keys to trust, and where they came from: the pinned ones (flag, then env)
    win over the ones the requester published."""
    if args.requester_key:
        return parse_public_keys(args.requester_key, source="--requester-key"), "--requester-key"
    pinned = os.environ.get(REQUESTER_KEY_ENV, "")
    if pinned.strip():
        return parse_public_keys(pinned, source=REQUESTER_KEY_ENV), f"pinned by {REQUESTER_KEY_ENV}"
    published = await fetch_requester_keys(client.bus.js)
    if published is None:
        return [], ""
    return published.keys, f"published by the requester in bucket {KEYS_BUCKET}/{KEYS_ENTRY}"


async def _verify(
    args: argparse.Namespace, client: Client
) -> tuple[list[Event], HistoryCheck, str]:
    record = await client.job(args.job_id)
    trusted, source = await _trusted_keys(args, client)
    # in stream order, as stored: verify_history reports events stored out of order
    events = [e async for _, e in client.bus.replay_events(subjects.events(record.id))]
    # every requester signs: a history with no key to check it against does not verify (else
    # deleting bacq-keys would drop an unpinned client back to checking the chain alone)
    check = verify_history(events, record, trusted, require_signatures=True)
    if trusted:
        keys = f"trusted key{'s' if len(trusted) > 1 else ''} {', '.join(trusted)} ({source})"
    else:
        keys = (
            f"no trusted requester key: none pinned ({REQUESTER_KEY_ENV}, --requester-key) and"
            f" none published in bucket {KEYS_BUCKET}"
        )
    return sorted(events, key=lambda e: e.seq), check, keys


async def cmd_history(args: argparse.Namespace, client: Client, out: Console) -> int:
    if args.verify:
        events, check, keys = await _verify(args, client)
    else:
        events = await client.history(args.job_id)
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
    if not args.verify:
        return 0
    out.print(f"verified with {escape(keys)}", soft_wrap=True)
    if not check.ok:
        out.print(f"[red]history of {escape(check.job_id)} does not verify:[/]", soft_wrap=True)
        for problem in check.problems:
            out.print(f"  - {escape(problem)}", soft_wrap=True)
        return 1
    out.print(f"[green]history verified:[/] {escape(check.summary())}", soft_wrap=True)
    if check.unsigned:
        out.print(
            f"[yellow]warning:[/] the events are NOT signed, so this proves only that the chain is"
            f" intact; {escape(keys)}",
            soft_wrap=True,
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
        help="check the hash chain, every event's signature and that the history ends at the"
        " job record's last event; names each problem (exit 1)",
    )
    history.add_argument(
        "--requester-key",
        metavar="KEY[,KEY]",
        help="the requester's public signing key(s) to trust with --verify, instead of those it"
        f" publishes in bucket {KEYS_BUCKET} (env {REQUESTER_KEY_ENV})",
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
