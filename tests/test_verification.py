"""Devstack scenarios of the verifier: quorum, outvoted liars, ties, and not enough workers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from bacq.client import Client
from bacq.devstack import Devstack
from bacq.states import ExecState, JobState
from bacq.storage import Storage
from tests.scenarios import BUSYBOX, HELLO_WORLD, setup_storage


async def _submit(stack: Devstack, client: Client, tmp_path: Path, **spec_fields: object) -> str:
    storage = await Storage.connect(stack.ipfs_api)
    try:
        cids = await setup_storage(storage, tmp_path, {"/data/file.txt": HELLO_WORLD})
    finally:
        await storage.close()
    spec = {
        "image": BUSYBOX,
        "command": ["sh", "-c", "cat /data/file.txt > /out/copy.txt"],
        "inputs": [{"cid": cids["/data/file.txt"], "path": "/data/file.txt"}],
        "outputs": [{"name": "result", "path": "/out"}],
        **spec_fields,
    }
    return await client.submit(spec)


async def _run(stack: Devstack, tmp_path: Path, **spec_fields: object) -> tuple[Client, str]:
    client = await Client.connect(stack.nats.url, options=stack.client_options())
    return client, await _submit(stack, client, tmp_path, **spec_fields)


async def test_three_honest_workers_are_all_verified(
    make_stack: Callable[..., Devstack], tmp_path: Path
) -> None:
    stack = make_stack(workers=3)
    client, job_id = await _run(stack, tmp_path, concurrency=3, confidence=2)
    try:
        job = await client.wait(job_id, timeout=120)
    finally:
        await client.close()
    assert job.state == JobState.ACCEPTED, job.reason
    states = {e.node_id: e.state for e in job.executions.values()}
    assert states == {"w1": ExecState.VERIFIED, "w2": ExecState.VERIFIED, "w3": ExecState.VERIFIED}
    assert {e.result_cid for e in job.executions.values()} == {job.result_cid}
    assert job.reason == "3 of 3 results agree"


async def test_bad_worker_is_outvoted_and_rejected(
    make_stack: Callable[..., Devstack], tmp_path: Path
) -> None:
    stack = make_stack(workers=3, bad_workers=1)  # w1 tampers with its output
    client, job_id = await _run(stack, tmp_path, concurrency=3, confidence=2)
    try:
        job = await client.wait(job_id, timeout=120)
    finally:
        await client.close()
    assert job.state == JobState.ACCEPTED, job.reason
    assert job.executions["w1"].state == ExecState.REJECTED
    assert job.executions["w2"].state == ExecState.VERIFIED
    assert job.executions["w3"].state == ExecState.VERIFIED
    assert job.executions["w1"].result_cid != job.result_cid
    assert job.reason == "2 of 3 results agree"


async def test_one_honest_and_one_bad_worker_tie_and_void_the_job(
    make_stack: Callable[..., Devstack], tmp_path: Path
) -> None:
    stack = make_stack(workers=2, bad_workers=1)
    client, job_id = await _run(stack, tmp_path, concurrency=2, confidence=1)
    try:
        job = await client.wait(job_id, timeout=120)
    finally:
        await client.close()
    assert job.state == JobState.VOID
    assert job.reason.startswith("tie:")
    assert job.result_cid is None
    assert {e.state for e in job.executions.values()} == {ExecState.REJECTED}


async def test_min_bids_above_worker_count_fails_and_frees_every_worker(
    make_stack: Callable[..., Devstack], tmp_path: Path
) -> None:
    # one job slot per worker: a reservation left behind would block the next job
    stack = make_stack(workers=3, max_jobs=1)
    client, job_id = await _run(stack, tmp_path, concurrency=1, min_bids=4, bid_timeout=3)
    try:
        job = await client.wait(job_id, timeout=60)
        assert job.state == JobState.FAILED
        assert "not enough bids: 3 of the 4 needed" in job.reason
        assert {e.state for e in job.executions.values()} == {ExecState.BID_REJECTED}

        # every worker bids again at once: its capacity was handed back, not left to expire
        (tmp_path / "again").mkdir()
        second = await _submit(stack, client, tmp_path / "again", concurrency=3, bid_timeout=5)
        follow_up = await asyncio.wait_for(client.wait(second), timeout=120)
        assert follow_up.state == JobState.ACCEPTED, follow_up.reason
    finally:
        await client.close()
