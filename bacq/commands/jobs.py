"""``bacq list``, ``describe``, ``cancel``, ``history`` and ``events``: reading jobs and their
histories, and cancelling them (the history commands run ``bacq._audit``'s code).

Touches NATS (the jobs bucket read-only, the events stream read-only, the cancel request) and the
terminal.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bacq import subjects
from bacq.commands.common import (
    EXIT_OK,
    SINCE_HELP,
    UsageError,
    add_command,
    connection_flags,
    emit,
    err,
    job_id_argument,
    key_values,
    nats_url,
    out,
    output_flag,
    parse_since,
)

if TYPE_CHECKING:
    import datetime as dt

    from bacq.models import JobRecord
    from bacq.states import JobState

__all__ = ["register"]

SORT_KEYS = ("created", "id", "image", "state", "updated")
REQUESTER_KEY_ENV = "BACQ_REQUESTER_KEY"  # bacq.signing.REQUESTER_KEY_ENV (a test checks)
_JOB_STATES = "pending,bidding,running,verifying,accepted,void,failed,cancelled"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    lst = add_command(sub, common, "list")
    lst.add_argument("-n", type=int, default=0, metavar="N", help="show at most N jobs")
    lst.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="STATE",
        help=f"only jobs in this state (repeatable or comma-separated: {_JOB_STATES})",
    )
    lst.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="only jobs with label"
    )
    lst.add_argument("--since", metavar="WHEN", help="only jobs created since: " + SINCE_HELP)
    lst.add_argument("--sort", choices=SORT_KEYS, default="created", help="sort key (created)")
    lst.add_argument("--reverse", action="store_true", help="reverse the order")
    lst.add_argument("--wide", action="store_true", help="more columns")
    lst.add_argument("-q", "--quiet", action="store_true", help="print only the job ids")
    output_flag(lst)
    connection_flags(lst)
    lst.set_defaults(func=cmd_list)

    describe = add_command(sub, common, "describe")
    job_id_argument(describe)
    output_flag(describe)
    connection_flags(describe)
    describe.set_defaults(func=cmd_describe)

    cancel = add_command(sub, common, "cancel")
    job_id_argument(cancel)
    connection_flags(cancel)
    cancel.set_defaults(func=cmd_cancel)

    history = add_command(sub, common, "history")
    job_id_argument(history)
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
        f" publishes in bucket {subjects.KEYS_BUCKET} (env {REQUESTER_KEY_ENV})",
    )
    output_flag(history, ("table", "json"))
    connection_flags(history)
    history.set_defaults(func=cmd_history)

    events = add_command(sub, common, "events")
    start = events.add_mutually_exclusive_group()
    start.add_argument("--since", metavar="WHEN", help="events since: " + SINCE_HELP)
    start.add_argument("--from-seq", type=int, metavar="N", help="from stream sequence N")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument(
        "--dead-letters",
        action="store_true",
        help="instead: the last messages a service gave up on (BACQ_DEAD), with the reason",
    )
    events.add_argument(
        "-n", "--last", type=int, default=50, metavar="N", help="with --dead-letters: how many"
    )
    events.add_argument(
        "--output", choices=["table", "json"], default="table", help="json: one object per line"
    )
    connection_flags(events)
    events.set_defaults(func=cmd_events)


# -- list ----------------------------------------------------------------------------------------
def _sort_key(name: str) -> Callable[[JobRecord], Any]:
    keys: dict[str, Callable[[JobRecord], Any]] = {
        "created": lambda j: j.created_at,
        "updated": lambda j: j.updated_at,
        "state": lambda j: (j.state.value, j.created_at),
        "image": lambda j: (j.spec.image, j.created_at),
        "id": lambda j: j.id,
    }
    return keys[name]


def parse_states(values: list[str]) -> set[JobState]:
    from bacq.states import JobState

    states = set()
    for value in ",".join(values).split(","):
        if not value.strip():
            continue
        try:
            states.add(JobState(value.strip().lower()))
        except ValueError:
            raise UsageError(
                f"--state {value!r} is not a job state; use one of "
                + ", ".join(s.value for s in JobState)
            ) from None
    return states


def _job_matches(
    job: JobRecord, states: set[JobState], labels: dict[str, str], since: dt.datetime | None
) -> bool:
    if states and job.state not in states:
        return False
    for key, value in labels.items():
        if job.spec.labels.get(key) != value:
            return False
    return since is None or job.created_at >= since


async def cmd_list(args: argparse.Namespace) -> int:
    from bacq.client import Client

    states = parse_states(args.state)
    labels = key_values(args.label, "label (--label)")
    since = parse_since(args.since) if args.since else None
    async with await Client.connect(nats_url(args)) as client:
        jobs = await client.jobs()
    jobs = [j for j in jobs if _job_matches(j, states, labels, since)]
    newest_first = args.sort in ("created", "updated")
    jobs.sort(key=_sort_key(args.sort), reverse=newest_first != args.reverse)
    jobs = jobs[: args.n] if args.n else jobs
    if args.quiet:
        for job in jobs:
            print(job.id)
    elif args.output in ("json", "yaml"):
        emit([j.model_dump(mode="json") for j in jobs], args.output)
    elif not jobs:
        err().print(
            "no jobs match these filters"
            if states or labels or since
            else "no jobs yet; submit one with `bacq run`"
        )
    else:
        from bacq.render import render_list

        render_list(out(), jobs, wide=args.wide)
    return EXIT_OK


# -- describe, cancel ------------------------------------------------------------------------------
async def cmd_describe(args: argparse.Namespace) -> int:
    from bacq.client import Client

    async with await Client.connect(nats_url(args)) as client:
        job = await client.job(args.job_id)
    if args.output in ("json", "yaml"):
        emit(job.model_dump(mode="json"), args.output)
    else:
        from bacq.render import render_describe

        render_describe(out(), job)
    return EXIT_OK


async def cmd_cancel(args: argparse.Namespace) -> int:
    from bacq.client import Client

    async with await Client.connect(nats_url(args)) as client:
        reply = await client.cancel(args.job_id)
    stopped = ", ".join(reply.stopped) or "no worker was running it"
    out().print(f"cancelled {args.job_id} (stopped on: {stopped})")
    return EXIT_OK


# -- history, events: bacq._audit does the work -----------------------------------------------
async def cmd_history(args: argparse.Namespace) -> int:
    from bacq._audit import cmd_history as history
    from bacq.client import Client

    async with await Client.connect(nats_url(args)) as client:
        return await history(args, client, out())


async def cmd_events(args: argparse.Namespace) -> int:
    from bacq._audit import cmd_events as events
    from bacq.client import Client

    if args.dead_letters:
        return await cmd_dead_letters(args)
    if args.since:  # read here, as every --since is: handed on as a time with its zone
        args.since = parse_since(args.since).isoformat()
    async with await Client.connect(nats_url(args)) as client:
        return await events(args, client, out())


async def cmd_dead_letters(args: argparse.Namespace) -> int:
    import json

    from bacq.client import Client

    async with await Client.connect(nats_url(args)) as client:
        letters = await client.bus.read_dead_letters(last=max(1, args.last))
    if args.output == "json":
        for letter in letters:
            print(
                json.dumps(
                    {
                        "seq": letter.seq,
                        "at": letter.at.isoformat() if letter.at else None,
                        "consumer": letter.consumer,
                        "subject": letter.subject,
                        "reason": letter.reason,
                        "bytes": len(letter.data),
                        "data": letter.data[:512].decode(errors="replace"),
                    }
                )
            )
        return EXIT_OK
    if not letters:
        err().print("no dead letters: every message was used or is still being tried")
        return EXIT_OK
    from rich.markup import escape  # what a worker sent is shown, never interpreted

    console = out()
    for letter in letters:
        at = f"{letter.at:%Y-%m-%d %H:%M:%S}" if letter.at else "?"
        preview = letter.data[:80].decode(errors="replace")
        console.print(
            f"{letter.seq:>6} {at} [bold]{escape(letter.consumer)}[/] "
            f"{escape(letter.subject)}: {escape(letter.reason)}",
            highlight=False,
        )
        size = len(letter.data)
        console.print(f"       {size} bytes: {preview!r}", highlight=False, markup=False)
    return EXIT_OK
