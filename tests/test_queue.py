"""The job queue: jobs beyond the workers' free slots wait in ``pending`` (not fail), are taken
oldest first as slots free, survive a requester restart, and give up after their queue_timeout.
Real nats-server, dockerd and kubo; the noop executor where only the message path matters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from bacq.client import Client
from bacq.devstack import Devstack
from bacq.states import JobState
from tests.scenarios import BUSYBOX

NOOP = ["--executor", "noop"]


def sleeper(seconds: float, **fields: object) -> dict[str, object]:
    return {"image": BUSYBOX, "command": ["sh", "-c", f"sleep {seconds}"], **fields}


async def test_jobs_beyond_the_free_slots_wait_in_the_queue_and_all_complete(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=1, kubo_nodes=1, max_jobs=1)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        ids = [await client.submit(sleeper(3)) for _ in range(4)]
        async with asyncio.timeout(60):  # the oldest goes first
            while True:
                if (await client.job(ids[0])).state == JobState.RUNNING:
                    break
                await asyncio.sleep(0.2)
        waiting = [await client.job(i) for i in ids[1:]]
        # one slot: one job runs, the others wait their turn instead of failing
        assert [j.state for j in waiting] == [JobState.PENDING] * 3, [j.state for j in waiting]
        jobs = [await client.wait(i, timeout=120) for i in ids]
    assert [j.state for j in jobs] == [JobState.ACCEPTED] * 4, [(j.state, j.reason) for j in jobs]
    started = [
        min(e.updated_at for e in j.executions.values() if e.state.value == "verified")
        for j in jobs
    ]
    assert started == sorted(started), "the queue is first in, first out"


@pytest.mark.timeout(900)  # waits up to 600 s for the jobs, plus the devstack
async def test_a_thousand_noop_jobs_on_few_slots_are_none_lost(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=2, kubo_nodes=1, max_jobs=3, worker_args=NOOP)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        spec = {"image": "none", "verifier": "noop"}
        slots = asyncio.Semaphore(100)

        async def submit() -> str:
            async with slots:
                return await client.submit(spec)

        ids = await asyncio.gather(*(submit() for _ in range(1000)))
        jobs = list((await client.wait_all(ids, timeout=600)).values())
    outcomes = {j.state for j in jobs}
    assert outcomes == {JobState.ACCEPTED}, [
        (j.id, j.state, j.reason) for j in jobs if j.state != JobState.ACCEPTED
    ][:5]


async def test_queued_jobs_survive_a_requester_restart(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=1, kubo_nodes=1, max_jobs=1)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        ids = [await client.submit(sleeper(3)) for _ in range(4)]
        async with asyncio.timeout(60):  # the oldest runs, the others wait their turn
            while True:
                if (await client.job(ids[0])).state == JobState.RUNNING:
                    break
                await asyncio.sleep(0.2)
        await asyncio.to_thread(stack.kill, "requester")
        # with the requester dead, the records hold still: some jobs were queued when it died
        queued = [i for i in ids if (await client.job(i)).state == JobState.PENDING]
        assert queued, [(await client.job(i)).state for i in ids]
        await asyncio.to_thread(stack.restart, "requester")
        jobs = [await client.wait(i, timeout=180) for i in ids]
    assert [j.state for j in jobs] == [JobState.ACCEPTED] * 4, [(j.state, j.reason) for j in jobs]


async def test_a_job_that_waits_past_its_queue_timeout_fails_with_the_reason(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=1, kubo_nodes=1, max_jobs=1)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        blocker = await client.submit(sleeper(20))
        await asyncio.sleep(4)
        late = await client.submit(sleeper(1, queue_timeout=2))
        job = await client.wait(late, timeout=60)
        await client.cancel(blocker)
    assert job.state == JobState.FAILED
    assert "in the queue (queue_timeout 2s)" in job.reason, job.reason
    assert "1 live worker(s) could run it, all busy" in job.reason, job.reason
