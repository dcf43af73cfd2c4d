"""``bacq nodes``: the workers seen, with their labels, capacity, jobs, heartbeat, verdicts and
conduct (quarantine), and which requester and verifier are active; ``bacq nodes release NODE``
lifts a node's quarantine.

Touches NATS (the node, reputation, lease and job records, read-only; the release request) and the
terminal.
"""

from __future__ import annotations

import argparse
from typing import Any

from bacq.commands.common import (
    EXIT_FAILED,
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
    nodes = add_command(sub, common, "nodes")
    nodes.add_argument("--wide", action="store_true", help="more columns")
    output_flag(nodes)
    connection_flags(nodes)
    nodes.set_defaults(func=cmd_nodes)
    actions = nodes.add_subparsers(dest="nodes_action", metavar="[release]")
    release = actions.add_parser(
        "release",
        help="let a quarantined node take jobs again (its record stays)",
        parents=[common],
    )
    release.add_argument("node", help="the node id, as `bacq nodes` shows it")
    connection_flags(release)
    release.set_defaults(func=cmd_release)


async def cmd_nodes(args: argparse.Namespace) -> int:
    import asyncio

    from bacq.client import Client
    from bacq.lease import read_leases
    from bacq.nodes import node_rows, read_nodes
    from bacq.reputation import read_reputations

    async with await Client.connect(nats_url(args)) as client:
        nodes, jobs, reputations, leases = await asyncio.gather(
            read_nodes(client.bus),
            client.jobs(),
            read_reputations(client.bus),
            read_leases(client.bus),
        )
    rows = node_rows(nodes, jobs, reputations=reputations)
    if args.output in ("json", "yaml"):
        emit(rows, args.output)
    elif not rows:
        err().print("no workers seen yet; start one with `bacq worker` (or `bacq devstack`)")
    else:
        from bacq.render import render_nodes

        render_nodes(out(), rows, wide=args.wide)
    if args.output == "table":
        for role in ("requester", "verifier"):
            holder = leases.get(role)
            err().print(
                f"active {role}: {holder.instance} since {holder.since:%Y-%m-%d %H:%M:%S}"
                if holder
                else f"active {role}: none holds the lease (is one running?)"
            )
    return EXIT_OK


async def cmd_release(args: argparse.Namespace) -> int:
    from bacq.client import Client
    from bacq.reputation import release_node

    async with await Client.connect(nats_url(args)) as client:
        reply = await release_node(client.bus, args.node)
    if not reply.ok:
        err().print(f"[red]error:[/] {reply.error}")
        return EXIT_FAILED
    out().print(f"released {args.node}: it is invited to bid again")
    return EXIT_OK
