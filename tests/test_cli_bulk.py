"""Bulk submission end to end against a devstack: ``bacq create -f`` of many jobs prints their ids
in file order and every job runs; ``Client.submit_many`` is idempotent per key; a spec the
requester refuses is named by its index while the others go through."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bacq import subjects, submission
from bacq.client import Client, job_ids_of
from bacq.devstack import Devstack
from bacq.errors import BatchRejected, SpecError
from bacq.states import JobState
from tests.conftest import run_cli

DEVSTACK = {"workers": 2}
BUSYBOX = "bacq-test/busybox"


def _job(i: int) -> dict[str, object]:
    return {"image": BUSYBOX, "command": ["echo", f"job-{i}"], "labels": {"n": str(i)}}


def test_create_submits_a_yaml_list_in_file_order_and_every_job_runs(
    stack: Devstack, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump([_job(i) for i in range(6)]))
    done = run_cli(stack, "create", "-f", str(path), "--wait", "--output", "json")
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert [r["spec"]["labels"]["n"] for r in records] == [str(i) for i in range(6)]
    assert {r["state"] for r in records} == {"accepted"}


def test_create_reads_json_lines_on_stdin_and_prints_one_id_per_job(stack: Devstack) -> None:
    lines = "".join(json.dumps(_job(i)) + "\n" for i in range(5))
    done = subprocess.run(
        [sys.executable, "-m", "bacq", "create", "-f", "-", "--idempotency-key", "bulk-test"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **stack.env()},
    )
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert len(ids) == 5
    assert len(set(ids)) == 5

    async def labels() -> list[str]:
        async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
            return [(await client.job(i)).spec.labels["n"] for i in ids]

    assert asyncio.run(labels()) == [str(i) for i in range(5)]
    again = subprocess.run(  # the same keys: the same jobs, nothing submitted twice
        [sys.executable, "-m", "bacq", "create", "-f", "-", "--idempotency-key", "bulk-test"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **stack.env()},
    )
    assert again.stdout.split() == ids


async def test_submit_many_keeps_order_across_batches_and_retries_give_the_same_jobs(
    stack: Devstack,
) -> None:
    specs = [_job(i) for i in range(23)]
    keys = [f"many-{i}" for i in range(23)]
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        ids = await client.submit_many(specs, keys)
        assert len(set(ids)) == 23
        # small batches, several in flight: the order is still the specs' order
        outcomes = await submission.submit_many(
            client.bus.nc,
            stack.nats.url,
            specs,
            keys,
            max_count=4,
            in_flight=3,
        )
        assert [o.job_id for o in outcomes] == ids
        done = await client.wait_all(ids, timeout=180)
    assert [done[i].spec.labels["n"] for i in ids] == [str(i) for i in range(23)]
    assert {j.state for j in done.values()} == {JobState.ACCEPTED}


async def test_submit_many_without_keys_sends_a_batch_key_and_a_resent_batch_gets_its_jobs(
    stack: Devstack,
) -> None:
    """No keys of the caller's: each batch carries one batch_key (one idempotency write on the
    requester); the same request sent again (a retry) answers the same job ids."""
    specs = [_job(i) for i in range(10)]
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        nc = client.bus.nc
        sent: list[bytes] = []
        request = nc.request

        async def recording(subject: str, payload: bytes = b"", **kw: Any) -> Any:
            if subject == subjects.SUBMIT_MANY:
                sent.append(payload)
            return await request(subject, payload, **kw)

        nc.request = recording  # type: ignore[method-assign]  # a spy on the real connection
        try:
            outcomes = await submission.submit_many(
                nc, stack.nats.url, specs, max_count=4, in_flight=2
            )
        finally:
            nc.request = request  # type: ignore[method-assign]
        ids = [o.job_id for o in outcomes]
        assert len(set(ids)) == 10
        assert None not in ids
        assert len(sent) == 3  # 4 + 4 + 2
        first = json.loads(sent[0])
        assert first["batch_key"]
        assert "idempotency_keys" not in first
        assert len({json.loads(p)["batch_key"] for p in sent}) == 3
        again = json.loads((await nc.request(subjects.SUBMIT_MANY, sent[0], timeout=30)).data)
        assert [r["job_id"] for r in again["results"]] == ids[:4]
        done = await client.wait_all([i for i in ids if i], timeout=180)
    assert {j.state for j in done.values()} == {JobState.ACCEPTED}


async def test_submit_many_checks_every_spec_before_sending_any(stack: Devstack) -> None:
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        before = len(await client.bus.job_ids())
        with pytest.raises(SpecError) as caught:
            await client.submit_many([_job(0), {"image": BUSYBOX, "timeout": -1}, _job(2)])
        assert [field for field, _ in caught.value.problems] == ["1.timeout"]
        assert len(await client.bus.job_ids()) == before


async def test_a_spec_the_requester_refuses_is_named_by_index_and_the_rest_go_through(
    stack: Devstack,
) -> None:
    refused = {"image": BUSYBOX, "concurrency": 0}  # sent as is: the requester checks it too
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        outcomes = await submission.submit_many(
            client.bus.nc, stack.nats.url, [_job(0), refused, _job(2)]
        )
        assert [o.ok for o in outcomes] == [True, False, True]
        assert outcomes[1].problems
        assert outcomes[1].problems[0][0] == "concurrency"
        with pytest.raises(BatchRejected) as caught:
            job_ids_of(outcomes)
        assert caught.value.job_ids[0] == outcomes[0].job_id
        assert caught.value.job_ids[1] is None
        assert caught.value.problems[0][0] == "1.concurrency"
