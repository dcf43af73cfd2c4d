"""``Bus.kv_keys``: a bucket's keys from its stream's subjects, against a real nats-server.
Every key is listed (a deleted one too, whose value reads as none), page after page past the
server's 100,000 subjects per answer, and an absent bucket is an error, not an empty list."""

from __future__ import annotations

import asyncio

import nats.js.errors
import pytest

from bacq.bus import Bus

STREAM, SUBJECTS = "KVKEYSTEST", "kvkeystest.>"


async def _bucket(bus: Bus, name: str) -> None:
    with pytest.raises(nats.js.errors.BucketNotFoundError):
        await bus.js.key_value(name)  # (the server is the module's: each test a bucket of its own)
    await bus.js.create_key_value(bucket=name, history=1)


async def test_every_key_is_listed_and_a_deleted_one_reads_as_none(scratch_bus: Bus) -> None:
    await _bucket(scratch_bus, "kvkeys-small")
    bucket = await scratch_bus.js.key_value("kvkeys-small")
    assert await scratch_bus.kv_keys("kvkeys-small") == []
    for key in ("a", "b.c", "d"):
        await bucket.put(key, b"x")
    await bucket.put("a", b"y")  # a key written twice is listed once
    await bucket.delete("d")
    assert sorted(await scratch_bus.kv_keys("kvkeys-small")) == ["a", "b.c", "d"]
    assert await scratch_bus.get_value("kvkeys-small", "d") is None


async def test_keys_beyond_one_answer_are_read_page_after_page(scratch_bus: Bus) -> None:
    await _bucket(scratch_bus, "kvkeys-large")
    count = 100_050  # the server answers with 100,000 subjects at most
    for i in range(count):  # (plain publishes: the stream stores them, no acknowledgement)
        await scratch_bus.nc.publish(f"$KV.kvkeys-large.k{i}", b"x")
    await scratch_bus.nc.flush()
    for _ in range(200):
        info = await scratch_bus.js.stream_info("KV_kvkeys-large")
        if info.state.messages == count:
            break
        await asyncio.sleep(0.05)
    keys = await scratch_bus.kv_keys("kvkeys-large")
    assert len(keys) == count
    assert set(keys) == {f"k{i}" for i in range(count)}


async def test_an_absent_bucket_is_an_error(scratch_bus: Bus) -> None:
    with pytest.raises(nats.js.errors.NotFoundError):
        await scratch_bus.kv_keys("kvkeys-absent")
