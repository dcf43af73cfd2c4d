"""What is known about the workers: their heartbeats, kept where ``bacq nodes`` can read them.

Touches NATS only: the core subject ``bacq.node.<node>.heartbeat`` and the key-value bucket
``bacq-nodes`` (key = node id, value = its latest ``NodeInfo``; each worker writes its own key).
``node_rows`` (pure) joins those records with the job records: running jobs and the verification
record (results verified / rejected) of each node.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from bacq import streams, subjects
from bacq.bus import Bus
from bacq.models import JobRecord, NodeInfo, Reputation, decode, encode, now
from bacq.states import EXEC_ACTIVE, ExecState

__all__ = ["OFFLINE_AFTER", "NodeRegistry", "node_rows", "read_nodes"]

OFFLINE_AFTER = 20.0  # seconds without a heartbeat after which a node is shown as offline
NODES_MAX_AGE = streams.BUCKETS[subjects.NODES_BUCKET].ttl  # silent this long: removed


async def nodes_bucket(bus: Bus) -> KeyValue:
    """The ``bacq-nodes`` bucket, declared from the table in ``bacq.streams``."""
    return await streams.ensure_bucket(bus.js, subjects.NODES_BUCKET)


class NodeRegistry:
    """A worker's side: publish its heartbeat and keep its key in the bucket up to date.

    The requester declares the bucket; a worker binds to it without a lookup (with NATS
    permissions on, a worker has no JetStream API: it may only publish to its own key).
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        name = subjects.NODES_BUCKET
        self._bucket = KeyValue(
            name=name, stream=f"KV_{name}", pre=f"$KV.{name}.", js=bus.js, direct=False
        )

    async def heartbeat(self, info: NodeInfo) -> None:
        await self.bus.publish(subjects.heartbeat(info.node_id), info)
        await self._bucket.put(info.node_id, encode(info))


async def read_nodes(bus: Bus) -> list[NodeInfo]:
    """Every node that has sent a heartbeat (and not vanished for a week), by node id."""
    bucket = await nodes_bucket(bus)
    keys = await bus.kv_keys(subjects.NODES_BUCKET)

    async def one(key: str) -> NodeInfo | None:
        try:
            entry = await bucket.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.errors.Error):
            return None
        try:  # each worker writes its own key: a bad one must not hide the others
            info = None if entry.value is None else decode(NodeInfo, entry.value)
        except ValueError:
            return None
        return info if info is None or info.node_id == key else None

    found = await asyncio.gather(*(one(k) for k in keys))
    return sorted((n for n in found if n is not None), key=lambda n: n.node_id)


def node_rows(
    nodes: list[NodeInfo],
    jobs: list[JobRecord],
    at: dt.datetime | None = None,
    reputations: dict[str, Reputation] | None = None,
) -> list[dict[str, Any]]:
    """One row per node (``bacq nodes``; the JSON keys are documented in the CLI guide).

    Nodes that appear only in job records (no heartbeat stored) are listed too, as offline;
    ``reputations`` adds each node's conduct and quarantine (bucket ``bacq-reputation``).
    """
    reputations = reputations or {}
    at = at or now()
    running: dict[str, list[str]] = {}
    verified: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for job in jobs:
        for execution in job.executions.values():
            node = execution.node_id
            if execution.state in EXEC_ACTIVE:
                running.setdefault(node, []).append(job.id)
            elif execution.state == ExecState.VERIFIED:
                verified[node] = verified.get(node, 0) + 1
            elif execution.state == ExecState.REJECTED:
                rejected[node] = rejected.get(node, 0) + 1
    known = {n.node_id: n for n in nodes}
    rows = []
    for node_id in sorted(set(known) | set(running) | set(verified) | set(rejected)):
        info = known.get(node_id)
        age = None if info is None else (at - info.at).total_seconds()
        rows.append(
            {
                "node_id": node_id,
                "online": age is not None and age <= OFFLINE_AFTER,
                "labels": {} if info is None else dict(info.labels),
                "cpu": None if info is None else info.cpu,
                "memory": None if info is None else info.memory,
                "max_jobs": None if info is None else info.max_jobs,
                "running": len(running.get(node_id, [])),
                "running_jobs": sorted(running.get(node_id, [])),
                "last_heartbeat": None if info is None else info.at.isoformat(),
                "seconds_since_heartbeat": None if age is None else round(age, 1),
                "verified": verified.get(node_id, 0),
                "rejected": rejected.get(node_id, 0),
                **_conduct(reputations.get(node_id)),
            }
        )
    return rows


def _conduct(record: Reputation | None) -> dict[str, Any]:
    if record is None:
        return {"quarantined": None, "offences": 0, "forged": 0, "malformed": 0, "bad_reveals": 0}
    return {
        "quarantined": record.quarantined,
        "offences": record.offences,
        "forged": record.forged,
        "malformed": record.malformed,
        "bad_reveals": record.bad_reveals,
    }
