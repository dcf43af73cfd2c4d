"""How a service process stops: on SIGTERM it winds down, and one that does not (stuck retrying a
NATS server that is gone) is cancelled after its grace. In-process, no components."""

from __future__ import annotations

import asyncio
import os
import signal

from bacq.cli import _serve


async def test_a_service_stops_when_told() -> None:
    stopped = asyncio.Event()

    async def polite(stop: asyncio.Event) -> None:
        await stop.wait()
        stopped.set()

    serving = asyncio.create_task(_serve(polite, stop_grace=30))
    await asyncio.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(serving, 10) == 0
    assert stopped.is_set()


async def test_a_service_that_does_not_wind_down_is_cancelled_after_its_grace() -> None:
    cancelled = asyncio.Event()

    async def stubborn(stop: asyncio.Event) -> None:
        try:
            await asyncio.sleep(3600)  # never looks at stop
        except asyncio.CancelledError:
            cancelled.set()
            raise

    serving = asyncio.create_task(_serve(stubborn, stop_grace=0.5))
    await asyncio.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(serving, 10) == 0
    assert cancelled.is_set()
