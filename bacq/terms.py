"""Ending a service's term (the requester's, the verifier's) in bounded time. Touches nothing but
the tasks it is given.

A term ends when its lease is lost, its NATS connection fails or the service stops. Its tasks are
cancelled and awaited, but not forever: a task waiting on a connection that was cut off (a flush
into a socket nobody reads) may take minutes to notice, and the next term must not wait for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from bacq.log import get_logger

__all__ = ["STOP_STEP", "stop_tasks"]

STOP_STEP = 5.0  # seconds one step of a term's ending may take (its tasks, a last write)
log = get_logger("bacq.terms")


async def stop_tasks(tasks: Iterable[asyncio.Task[object]], *, timeout: float = STOP_STEP) -> None:
    """Cancel ``tasks`` and wait for them, at most ``timeout`` seconds; the ones still running
    then are left to end on their own (and named in the log)."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return
    _, stuck = await asyncio.wait(pending, timeout=timeout)
    if stuck:
        log.warning("term.tasks_stuck", tasks=sorted(t.get_name() for t in stuck)[:20])
