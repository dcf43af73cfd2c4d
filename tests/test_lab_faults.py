"""Faults in the lab (bacq.lab): a worker, a NATS server, the active requester and a worker's kubo
cut off mid-job, and a small chaos run; every job ends once, accepted once, with a history that
verifies.

One lab (4 workers, 2 requesters, 2 verifiers) serves the whole module: bringing one up is the
slow part. Each test undoes its faults in ``finally`` and leaves the lab whole for the next. Runs as
root (CI does); a lab that cannot come up fails the tests. Waits are for conditions, each bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from bacq import subjects
from bacq.auth import NatsOptions
from bacq.bus import again
from bacq.client import Client
from bacq.events import Event, verify_history
from bacq.lab import Lab, net
from bacq.lab.chaos import chaos
from bacq.lease import LEASE_TTL, RENEW_EVERY, read_leases
from bacq.models import JobRecord
from bacq.signing import fetch_requester_keys
from bacq.states import ExecState, JobState
from bacq.storage import Storage
from tests.scenarios import BUSYBOX

pytestmark = pytest.mark.lab

WORKERS = 4
FETCH_TIMEOUT = 15.0  # seconds a worker waits for inputs before it hands the job back
TAKEOVER_BOUND = 3 * (LEASE_TTL + RENEW_EVERY) + 20  # + the NATS client noticing a silent server
SLOW = {"image": BUSYBOX, "command": ["sh", "-c", "sleep 10; echo slept"], "timeout": 120}


FINAL = ("accepted", "failed", "void", "cancelled")


def _hello(word: str) -> dict[str, Any]:
    return {"image": BUSYBOX, "command": ["echo", word], "timeout": 60}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    index = 1 + (os.getpid() + 75) % 150  # not test_lab's; other runs use other pids
    the_lab = Lab(
        index=index,
        workers=WORKERS,
        requesters=2,
        verifiers=2,
        state_dir=tmp_path_factory.mktemp("faults") / "lab",
        fetch_timeout=FETCH_TIMEOUT,
    )
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down()
    # nothing of it is left: namespaces (with their rules), veths (with their qdiscs), the bridge
    assert net.namespaces(the_lab.prefix + "-") == []
    assert net.host_veths(f"bl{the_lab.index}h") == []
    assert net.host_veths(the_lab.bridge) == []


async def _connect(lab: Lab) -> Client:
    env = lab.env()
    return await Client.connect(env["BACQ_NATS_URL"], options=NatsOptions.from_env("client", env))


async def _until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        await asyncio.sleep(0.2)


async def _node_in(client: Client, job_id: str, states: set[ExecState]) -> str:
    """Wait for an execution of the job in one of ``states``; its node."""
    found: list[str] = []

    async def check() -> bool:
        job = await client.job(job_id)
        found[:] = [n for n, e in job.executions.items() if e.state in states]
        return bool(found)

    await _until(f"{job_id} with an execution in {sorted(states)}", check)
    return found[0]


async def _events(client: Client, job_id: str) -> list[Event]:
    async def read() -> list[Event]:
        return [e async for _, e in client.bus.replay_events(subjects.events(job_id))]

    return await again(read)  # (JetStream may be electing a leader just then)


async def _decided_once_and_verifies(client: Client, job: JobRecord) -> None:
    """One final event (``bacq history`` shows one verdict) and ``history --verify`` holds."""
    events = await _events(client, job.id)
    final = [e for e in events if e.kind == "job" and e.state in FINAL]
    assert len(final) == 1, [(e.seq, e.state) for e in final]
    keys = await fetch_requester_keys(client.bus.js)
    assert keys is not None
    check = verify_history(events, await client.job(job.id), keys.keys, require_signatures=True)
    assert check.ok, check.problems


def _log_lines(lab: Lab, service: str) -> list[str]:
    return (lab.logs / f"{service}.log").read_text(errors="replace").splitlines()


def _log_has(lab: Lab, service: str, *words: str, after: int = 0) -> bool:
    """Whether a line of ``service``'s log (from line ``after`` on) has all of ``words``."""
    return any(all(w in line for w in words) for line in _log_lines(lab, service)[after:])


def _assert_whole(lab: Lab) -> None:
    """Every host runs its services (none died of the fault); else what their logs end with."""
    report = lab.status()
    if report["ok"]:
        return
    broken = [r for r in report["hosts"] if not r["ok"]]
    tails = {
        r["host"]: (lab.logs / f"{r['host']}.log").read_text(errors="replace")[-3000:]
        for r in broken
    }
    raise AssertionError(f"hosts not whole after the fault: {broken}\n{tails}")


async def _active(client: Client, lab: Lab, role: str) -> str | None:
    """The host holding ``role``'s lease; None between holders or while NATS is unsure."""
    try:
        holder = (await read_leases(client.bus)).get(role)
    except (nats.errors.Error, TimeoutError):  # (this client may be moving to another server)
        return None
    if holder is None:
        return None
    for host in lab.hosts():
        if host.role == role and lab.pid(host.name) == holder.pid:
            return host.name
    return None


async def test_a_worker_cut_off_mid_job_is_retried_elsewhere_and_its_late_result_is_ignored(
    lab: Lab,
) -> None:
    async with await _connect(lab) as client:
        job_id = await client.submit(SLOW)
        cut = await _node_in(client, job_id, {ExecState.RUNNING})
        lab.cut(cut)
        try:
            job = await client.wait(job_id, timeout=240)
            assert job.state == JobState.ACCEPTED, job.reason
            assert job.executions[cut].state == ExecState.LOST, job.executions[cut]
            (winner,) = [n for n, e in job.executions.items() if e.state == ExecState.VERIFIED]
            assert winner != cut
        finally:
            lab.heal(cut)
        # healed, the cut worker finishes its container and sends its result, late
        await _until(
            f"{cut} sending its late result",
            lambda: asyncio.to_thread(_log_has, lab, cut, job_id, "job.completed"),
            timeout=180,
        )
        # a job submitted after the late result went out is decided after it was seen
        after = await client.wait(await client.submit(_hello("after")), timeout=240)
        assert after.state == JobState.ACCEPTED, after.reason
        again = await client.job(job_id)
        assert again.state == JobState.ACCEPTED
        assert again.result_cid == job.result_cid
        assert again.executions[cut].state == ExecState.LOST
        assert again.executions[winner].state == ExecState.VERIFIED
        await _decided_once_and_verifies(client, again)
    _assert_whole(lab)


async def test_jobs_keep_flowing_through_two_nats_servers_when_the_third_is_cut_off(
    lab: Lab,
) -> None:
    async with await _connect(lab) as client:
        lab.cut("nats-1")
        try:
            # (this client may have been on the cut server: it moves to another after 15 s)
            ids = [
                await client.submit(_hello(f"two of three {i}"), timeout=20, attempts=10)
                for i in range(4)
            ]
            jobs = [await client.wait(j, timeout=300) for j in ids]
            for job in jobs:
                assert job.state == JobState.ACCEPTED, job.reason
                await _decided_once_and_verifies(client, job)
        finally:
            lab.heal("nats-1")
        _assert_whole(lab)


async def test_the_standby_requester_takes_over_from_a_cut_off_one_and_no_job_is_driven_twice(
    lab: Lab,
) -> None:
    async with await _connect(lab) as client:
        found: list[str] = []

        async def one_active() -> bool:
            found[:] = [h for h in [await _active(client, lab, "requester")] if h]
            return bool(found)

        await _until("a requester holding the lease", one_active, 60)
        job_id = await client.submit(SLOW)
        await _node_in(client, job_id, {ExecState.RUNNING})
        # the holder read again just before the cut: on a loaded machine a term may end early (a
        # JetStream timeout while it starts) and the lease move before the job runs
        await _until("a requester holding the lease", one_active, 60)
        old = found[0]
        (standby,) = [h.name for h in lab.hosts() if h.role == "requester" and h.name != old]
        seen = len(await asyncio.to_thread(_log_lines, lab, old))
        lab.cut(old)
        try:
            start = time.monotonic()

            async def taken_over() -> bool:
                return await _active(client, lab, "requester") == standby

            await _until("the standby taking the lease", taken_over, TAKEOVER_BOUND)
            print(f"requester takeover after a cut: {time.monotonic() - start:.1f}s")
            job = await client.wait(job_id, timeout=240)
            assert job.state == JobState.ACCEPTED, job.reason
        finally:
            lab.heal(old)
        # healed, the old one finds itself deposed and stands by; it writes nothing
        try:
            await _until(
                f"{old} noticing it was deposed",
                lambda: asyncio.to_thread(_log_has, lab, old, "requester.deposed", after=seen),
                timeout=180,
            )
        except AssertionError:
            print(f"{old}'s log since the cut:", *_log_lines(lab, old)[seen:][-60:], sep="\n")
            raise
        assert lab.pid(old) is not None
        after = await client.wait(await client.submit(_hello("after the cut")), timeout=240)
        assert after.state == JobState.ACCEPTED, after.reason
        assert await _active(client, lab, "requester") == standby
        for one in (await client.job(job_id), after):
            await _decided_once_and_verifies(client, one)


async def test_a_worker_whose_kubo_is_cut_off_mid_fetch_hands_the_job_back_and_it_runs_elsewhere(
    lab: Lab, tmp_path: Path
) -> None:
    payload = tmp_path / "input.bin"
    payload.write_bytes(os.urandom(256 * 1024))
    storage = await Storage.connect(lab.ipfs_api)
    try:
        cid = await storage.add(payload)
    finally:
        await storage.close()
    workers = [h.name for h in lab.hosts() if h.role == "worker"]
    async with await _connect(lab) as client:
        # every worker's kubo off the swarm, so that whichever worker gets the job is still
        # fetching when the others come back
        for worker in workers:
            lab.cut(worker, only="ipfs")
        try:
            job_id = await client.submit(
                {
                    "image": BUSYBOX,
                    "command": ["sh", "-c", "wc -c < /data/input.bin"],
                    "inputs": [{"cid": cid, "path": "/data/input.bin"}],
                    "timeout": 120,
                }
            )
            stuck = await _node_in(client, job_id, {ExecState.DOWNLOADING})
            for worker in workers:
                if worker != stuck:
                    lab.heal(worker)
            job = await client.wait(job_id, timeout=300)
        finally:
            for worker in workers:
                lab.heal(worker)
        assert job.state == JobState.ACCEPTED, job.reason
        lost = job.executions[stuck]
        assert lost.state == ExecState.LOST
        assert f"input {cid} for /data/input.bin" in (lost.error or "")
        assert f"could not fetch {cid} from IPFS within {FETCH_TIMEOUT:g}s" in (lost.error or "")
        (winner,) = [n for n, e in job.executions.items() if e.state == ExecState.VERIFIED]
        assert winner != stuck
        await _decided_once_and_verifies(client, job)


async def test_a_small_chaos_run_loses_no_job_and_decides_none_twice(lab: Lab) -> None:
    args = argparse.Namespace(
        jobs=40,
        seed=7,
        parallel=8,
        rate=1.0,  # about 40 s of jobs, so that several faults meet them
        fault_every=3.0,
        hold=8.0,
        faults="cut-worker,kill-worker,cut-nats,kill-nats,cut-requester,kill-requester,"
        "kill-verifier",
        timeout=900.0,
    )
    figures = await chaos(lab, args)
    print(figures.table())
    assert figures.ok, figures.as_dict()
    assert sum(figures.faults.values()) >= 2
    assert sum(figures.states.values()) == 40
    assert figures.fault_errors == []
    _assert_whole(lab)
