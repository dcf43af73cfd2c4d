"""The job queue: jobs beyond the workers' free slots wait in ``pending`` (not fail), are taken
oldest first as slots free, survive a requester restart, and give up after their queue_timeout.
Real nats-server, dockerd and kubo; the noop executor where only the message path matters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from bacq.client import Client
from bacq.devstack import Devstack
from bacq.models import SubmitManyReply, SubmitManyRequest
from bacq.states import JobState
from bacq.subjects import SUBMIT_MANY
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


async def test_a_retried_batch_with_its_batch_key_gets_the_same_jobs_and_runs_each_once(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=2, kubo_nodes=1, worker_args=NOOP)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        specs: list[dict[str, object]] = [{"image": "none", "verifier": "noop"}] * 5
        specs = [*specs, {"image": "none", "concurrency": 0}]  # refused: its problems each time
        request = SubmitManyRequest(specs=specs, batch_key="batch-under-test")
        first = await client.bus.request(SUBMIT_MANY, request, SubmitManyReply, timeout=30)
        again = await client.bus.request(SUBMIT_MANY, request, SubmitManyReply, timeout=30)
        ids = [r.job_id for r in first.results]
        assert ids[:5] == [r.job_id for r in again.results][:5]
        assert None not in ids[:5]
        assert len(set(ids[:5])) == 5
        assert ids[5] is None
        assert again.results[5].problems, again.results[5]
        other = SubmitManyRequest(specs=specs[:2], batch_key="batch-under-test")
        refused = await client.bus.request(SUBMIT_MANY, other, SubmitManyReply, timeout=30)
        assert "batch_key" in (refused.error or ""), refused
        jobs = await client.wait_all([i for i in ids if i], timeout=120)
        assert {j.state for j in jobs.values()} == {JobState.ACCEPTED}
        for job_id in ids[:5]:
            assert job_id is not None
            history = await client.history(job_id)
            assert [e.kind for e in history].count("submitted") == 1
            accepted = [e for e in history if e.kind == "job" and e.state == "accepted"]
            assert len(accepted) == 1, history
