"""How the services read their durable consumers (``Bus.consume_batches``), against a real
nats-server: a message that comes alone is handed on at once, not held until its pull request
expires; a burst comes in groups; a pull that expires is renewed; nothing is lost or repeated."""

from __future__ import annotations

import asyncio

import pytest

from bacq import bus as bus_module
from bacq.bus import Bus

STREAM, SUBJECTS = "PULLTEST", "pulltest.>"


@pytest.fixture
def bus(scratch_bus: Bus) -> Bus:
    return scratch_bus


async def test_a_lone_message_is_handed_on_at_once_and_a_burst_in_groups(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pulls open for a minute: a message held until its pull expires would come after that
    monkeypatch.setattr(bus_module, "PULL_EXPIRES", 60.0)
    batches: asyncio.Queue[list[bytes]] = asyncio.Queue()
    going = asyncio.Event()  # the reader's own work: cleared, it is busy with a batch
    going.set()

    async def read() -> None:
        async for msgs in bus.consume_batches(SUBJECTS, "pull-test", stream=STREAM, batch=16):
            for msg in msgs:
                await msg.ack()
            await batches.put([m.data for m in msgs])
            await going.wait()

    reader = asyncio.create_task(read())
    try:
        await asyncio.sleep(0.5)  # the reader's pull is open and waiting
        await bus.js.publish("pulltest.one", b"alone")
        assert await asyncio.wait_for(batches.get(), timeout=10) == [b"alone"]
        going.clear()  # busy with the next one while the burst comes
        for i in range(100):  # more than a pull asks for: renewed while it runs
            await bus.js.publish(f"pulltest.{i % 7}", str(i).encode())
        got: list[bytes] = await asyncio.wait_for(batches.get(), timeout=10)
        sizes: list[int] = []
        going.set()
        while len(got) < 100:
            group = await asyncio.wait_for(batches.get(), timeout=10)
            got += group
            sizes.append(len(group))
        assert got == [str(i).encode() for i in range(100)]  # in order, none lost or twice
        assert max(sizes) > 1  # what had come while the reader was busy came together …
        assert max(sizes) <= 16  # … at most a batch at a time
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def test_an_expired_pull_is_renewed_and_the_next_message_still_comes(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus_module, "PULL_EXPIRES", 0.3)
    batches: asyncio.Queue[list[bytes]] = asyncio.Queue()

    async def read() -> None:
        async for msgs in bus.consume_batches(SUBJECTS, "pull-renew", stream=STREAM, batch=4):
            for msg in msgs:
                await msg.ack()
            await batches.put([m.data for m in msgs])

    reader = asyncio.create_task(read())
    try:
        await asyncio.sleep(2.0)  # several pulls expire meanwhile
        await bus.js.publish("pulltest.late", b"late")
        assert await asyncio.wait_for(batches.get(), timeout=10) == [b"late"]
        assert batches.empty()
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
