"""``bacq nodes``: the workers seen, with their labels, capacity, jobs, heartbeat and verdicts.

Touches NATS (the node records and the jobs bucket, read-only) and the terminal.
"""

from __future__ import annotations

import argparse
from typing import Any

from bacq.commands.common import (
    EXIT_OK,
    add_command,
    connection_flags,
    emit,
    err,
    nats_url,
    out,
    output_flag,
)

__all__ = ["register"]


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    nodes = add_command(
        sub, common, "nodes", "workers seen: labels, capacity, jobs, heartbeat, verification"
    )
    nodes.add_argument("--wide", action="store_true", help="more columns")
    output_flag(nodes)
    connection_flags(nodes)
    nodes.set_defaults(func=cmd_nodes)


async def cmd_nodes(args: argparse.Namespace) -> int:
    import asyncio

    from bacq.client import Client
    from bacq.nodes import node_rows, read_nodes

    async with await Client.connect(nats_url(args)) as client:
        nodes, jobs = await asyncio.gather(read_nodes(client.bus), client.jobs())
    rows = node_rows(nodes, jobs)
    if args.output in ("json", "yaml"):
        emit(rows, args.output)
    elif not rows:
        err().print("no workers seen yet; start one with `bacq worker` (or `bacq devstack`)")
    else:
        from bacq.render import render_nodes

        render_nodes(out(), rows, wide=args.wide)
    return EXIT_OK
