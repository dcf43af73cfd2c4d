"""Audit commands of the CLI: ``bacq history``, ``bacq events`` and ``bacq cancel``.

Touches NATS through ``bacq.client`` and prints to the terminal; ``bacq.commands.jobs`` registers
the parsers (and reads ``--since``) and calls these.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bacq import subjects
from bacq.client import Client
from bacq.events import Event, HistoryCheck, verify_history
from bacq.signing import (
    KEYS_BUCKET,
    KEYS_ENTRY,
    REQUESTER_KEY_ENV,
    fetch_requester_keys,
    parse_public_keys,
)

__all__ = ["cmd_cancel", "cmd_events", "cmd_history"]


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
    # bacq.commands.jobs read --since with the CLI's one parser and handed it on as ISO 8601
    since = dt.datetime.fromisoformat(args.since) if args.since else None
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
