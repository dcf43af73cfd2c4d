"""A hostile worker cannot win: each attack of docs/security.md against a real devstack.

The attacker speaks as worker ``w3`` on every subject that node's NATS user may publish on
(``hostile_connection``), or runs as a real worker in a hostile mode (``BACQ_WORKER_LAZY``). Each
test asserts that the attack changes nothing for the honest workers' jobs and that it is counted
against the attacker's node (``bacq-reputation``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import nats
from nats.aio.client import Client as NatsClient

from bacq import subjects
from bacq.bus import Bus
from bacq.client import Client
from bacq.devstack import Devstack
from bacq.models import Reputation, decode
from bacq.reputation import reputation_bucket
from bacq.states import ExecState, JobState
from bacq.storage import Storage
from tests.conftest import run_cli
from tests.scenarios import BUSYBOX

HELLO = {"image": BUSYBOX, "command": ["echo", "hello"], "timeout": 60}
DETERMINISTIC = {**HELLO, "concurrency": 3, "confidence": 2, "verifier": "deterministic"}


@asynccontextmanager
async def hostile_connection(stack: Devstack, node: str) -> AsyncIterator[NatsClient]:
    """A NATS connection with what ``node``'s operator holds: that worker's credentials."""
    env = stack.worker_env(node) if hasattr(stack, "worker_env") else {}
    kwargs: dict[str, object] = {"inbox_prefix": "_INBOX.worker"}
    if env.get("BACQ_NATS_USER"):
        password = env.get("BACQ_NATS_PASSWORD")
        if password is None and env.get("BACQ_NATS_PASSWORD_FILE"):
            password = Path(env["BACQ_NATS_PASSWORD_FILE"]).read_text().strip()
        kwargs.update(user=env["BACQ_NATS_USER"], password=password)
    nc = await nats.connect(stack.nats.url, **kwargs)  # type: ignore[arg-type]
    try:
        yield nc
    finally:
        await nc.close()


async def _reputation(client: Client, node: str) -> Reputation | None:
    bucket = await reputation_bucket(client.bus)
    try:
        entry = await bucket.get(node)
    except Exception:
        return None
    return decode(Reputation, entry.value) if entry.value else None


async def _eventually_reputation(
    client: Client, node: str, check: Callable[[Reputation], bool], timeout: float = 30.0
) -> Reputation:
    deadline = time.monotonic() + timeout
    record = None
    while time.monotonic() < deadline:
        record = await _reputation(client, node)
        if record is not None and check(record):
            return record
        await asyncio.sleep(0.5)
    raise AssertionError(f"reputation of {node} never fit: {record}")


async def _forge_until_final(
    nc: NatsClient, client: Client, job_id: str, me: str, victim: str
) -> int:
    """Speak for ``victim`` on ``me``'s subjects, again and again, until the job ends."""
    forged = 0
    lies = [
        (
            subjects.exec_update(job_id, me),
            {"job_id": job_id, "node_id": victim, "state": "lost", "error": "handed back"},
        ),
        (
            subjects.verify(job_id, me),
            {"job_id": job_id, "node_id": victim, "error": "it failed, honestly"},
        ),
        (subjects.bid(me, job_id), {"job_id": job_id, "node_id": victim}),
        (
            subjects.heartbeat(me),
            {
                "node_id": victim,
                "cpu": 1,
                "memory": 1,
                "max_jobs": 0,
                "running": 0,
                "draining": True,
            },
        ),
        # the right node, another job: progress for a job it was never given
        (
            subjects.exec_update(job_id, me),
            {"job_id": "j-00000000000000000000", "node_id": me, "state": "completed"},
        ),
    ]
    while not (await client.job(job_id)).final:
        for subject, payload in lies:
            await nc.publish(subject, json.dumps(payload).encode())
            forged += 1
        await nc.flush()
        await asyncio.sleep(0.2)
    return forged


async def test_forged_ids_on_every_message_kind_change_nothing(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=3)
    async with (
        await Client.connect(stack.nats.url, options=stack.client_options()) as client,
        hostile_connection(stack, "w3") as nc,
    ):
        job_id = await client.submit(DETERMINISTIC)
        forged = await _forge_until_final(nc, client, job_id, "w3", "w1")
        job = await client.job(job_id)
        assert job.state == JobState.ACCEPTED, job.reason
        assert job.executions["w1"].state == ExecState.VERIFIED
        assert job.executions["w2"].state == ExecState.VERIFIED
        record = await _eventually_reputation(client, "w3", lambda r: r.forged >= 3)
        assert record.forged + record.malformed <= forged


async def test_hijacked_message_ids_erase_no_result_and_no_verdict(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=3)
    async with (
        await Client.connect(stack.nats.url, options=stack.client_options()) as client,
        hostile_connection(stack, "w3") as nc,
    ):
        job_id = await client.submit(DETERMINISTIC)
        # the job assigned first: the 17 malformed messages below get w3 quarantined (as they
        # should), which would keep it out of the bidding had they come before its bid
        deadline = asyncio.get_running_loop().time() + 60
        while (await client.job(job_id)).state in (JobState.PENDING, JobState.BIDDING):
            assert asyncio.get_running_loop().time() < deadline, "the job was never assigned"
            await asyncio.sleep(0.01)
        # every id bacq used to use, taken first on the attacker's own subject
        ids = [f"verdict.{job_id}"] + [
            f"{kind}.{job_id}.{node}{suffix}"
            for kind in ("verify", "exec")
            for node in ("w1", "w2")
            for suffix in ("", ".completed", ".running", ".accepted")
        ]
        js = nc.jetstream()
        for msg_id in ids:
            try:
                await js.publish(
                    subjects.exec_update(job_id, "w3"), b"{}", headers={"Nats-Msg-Id": msg_id}
                )
            except Exception:  # a worker may have no JetStream acks on its inbox: fine
                await nc.publish(
                    subjects.exec_update(job_id, "w3"), b"{}", headers={"Nats-Msg-Id": msg_id}
                )
        job = await client.wait(job_id, timeout=120)
        assert job.state == JobState.ACCEPTED, job.reason
        assert {n for n, e in job.executions.items() if e.state == ExecState.VERIFIED} == {
            "w1",
            "w2",
            "w3",
        }


async def test_a_flood_of_malformed_messages_delays_no_job_and_quarantines_its_sender(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=3)
    async with (
        await Client.connect(stack.nats.url, options=stack.client_options()) as client,
        hostile_connection(stack, "w3") as nc,
    ):
        before = time.monotonic()
        baseline = await client.wait(await client.submit(HELLO), timeout=120)
        usual = time.monotonic() - before
        assert baseline.state == JobState.ACCEPTED
        junk = [b"", b"{", b'{"job_id": "x.y", "node_id": "w3"}', b"[]"]
        job_ids = ["j-00000000000000000000", "not_a_job", "j-" + "f" * 60]
        n = 0
        for i in range(5000):
            data = b"\xff" * 70_000 if i % 250 == 0 else junk[i % len(junk)]
            job = job_ids[i % len(job_ids)]
            for subject in (
                subjects.bid("w3", job),
                subjects.heartbeat("w3"),
                subjects.exec_update(job, "w3"),
                subjects.verify(job, "w3"),
                subjects.logs(job, "w3"),
            ):
                await nc.publish(subject, data)
                n += 1
            if i % 500 == 0:
                # its own node record too (the one key of bacq-nodes it may write)
                await nc.publish("$KV.bacq-nodes.w3", data or b"{}")
                await nc.flush()
        await nc.flush()
        # the next job is taken and accepted as usual (its bound: the usual time plus what a
        # 2-core machine needs to drop 25,000 messages, far below the job's own deadlines)
        start = time.monotonic()
        job = await client.wait(await client.submit(HELLO), timeout=120)
        took = time.monotonic() - start
        assert job.state == JobState.ACCEPTED, job.reason
        print(f"usual {usual:.2f}s; after {n} malformed messages {took:.2f}s")
        record = await _eventually_reputation(client, "w3", lambda r: r.quarantined is not None)
        assert "malformed" in (record.quarantined or "")
        # quarantined: no job goes to w3 until it is released
        job = await client.wait(
            await client.submit({**HELLO, "concurrency": 2, "confidence": 2}), timeout=120
        )
        assert job.state == JobState.ACCEPTED, job.reason
        assert "w3" not in job.executions
        # what an operator sees, and how it lets the node back in
        nodes = await asyncio.to_thread(run_cli, stack, "nodes")
        assert "quarantined" in nodes.stdout, nodes.stdout
        assert "bacq nodes release w3" in nodes.stdout
        assert "active requester:" in nodes.stderr
        dead = await asyncio.to_thread(run_cli, stack, "events", "--dead-letters", "-n", "5")
        assert dead.returncode == 0, dead.stderr
        assert "bacq.exec." in dead.stdout or "bacq.verify." in dead.stdout, dead.stdout
        released = await asyncio.to_thread(run_cli, stack, "nodes", "release", "w3")
        assert released.returncode == 0, released.stderr
        record = await _eventually_reputation(client, "w3", lambda r: r.quarantined is None)
        assert record.released_at is not None
        again = await asyncio.to_thread(run_cli, stack, "nodes", "release", "w3")
        assert again.returncode != 0
        assert "not quarantined" in again.stderr


async def test_dead_letters_of_a_fresh_network_are_none(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=0)
    dead = await asyncio.to_thread(run_cli, stack, "events", "--dead-letters", "-n", "5")
    assert dead.returncode == 0, dead.stderr
    assert "no dead letters" in dead.stderr


async def test_a_lazy_worker_is_outvoted_in_every_job_it_runs(
    make_stack: Callable[..., Devstack],
) -> None:
    # w3 runs no container: it builds its result from whatever it can read of the others'
    stack = make_stack(workers=4, role_env={"w3": {"BACQ_WORKER_LAZY": "1"}})
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_ids = [await client.submit(DETERMINISTIC) for _ in range(20)]
        jobs = [await client.wait(job_id, timeout=300) for job_id in job_ids]
    ran = 0
    for job in jobs:
        assert job.state == JobState.ACCEPTED, job.reason
        lazy = job.executions.get("w3")
        if lazy is not None and lazy.state not in (ExecState.BID_REJECTED, ExecState.BID):
            ran += 1
            assert lazy.state == ExecState.REJECTED, (job.id, lazy)
            assert lazy.result_cid != job.result_cid
    assert ran >= 1, "the lazy worker never got a job"


async def test_two_nodes_of_one_operator_never_run_the_same_job(
    make_stack: Callable[..., Devstack], tmp_path: Path
) -> None:
    config = tmp_path / "nodes.yaml"
    config.write_text("nodes:\n  w1: {operator: alice}\n  w2: {operator: alice}\n")
    stack = make_stack(workers=3, role_env={"requester": {"BACQ_NODES_CONFIG": str(config)}})
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_ids = [
            await client.submit({**HELLO, "concurrency": 2, "confidence": 2}) for _ in range(6)
        ]
        jobs = [await client.wait(job_id, timeout=180) for job_id in job_ids]
    for job in jobs:
        assert job.state == JobState.ACCEPTED, job.reason
        ran = {
            n
            for n, e in job.executions.items()
            if e.state not in (ExecState.BID, ExecState.BID_REJECTED)
        }
        assert "w3" in ran, ran
        assert not {"w1", "w2"} <= ran, ran


async def test_capacity_a_worker_claims_is_capped_by_the_operator_config(
    make_stack: Callable[..., Devstack], tmp_path: Path
) -> None:
    # w1 offers 4 slots; its operator's config allows it 1
    config = tmp_path / "nodes.yaml"
    config.write_text("nodes:\n  w1: {max_jobs: 1}\n")
    stack = make_stack(
        workers=1, max_jobs=4, role_env={"requester": {"BACQ_NODES_CONFIG": str(config)}}
    )
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        spec = {**HELLO, "command": ["sleep", "2"]}
        job_ids = [await client.submit(spec) for _ in range(3)]
        jobs = [await client.wait(job_id, timeout=180) for job_id in job_ids]
        histories = [await client.history(job_id) for job_id in job_ids]
    assert all(j.state == JobState.ACCEPTED for j in jobs), [j.reason for j in jobs]
    # when w1 held each job's slot, by the requester's own clock: from its choice to its answer
    held = []
    for history in histories:
        mine = [e for e in history if e.kind == "execution" and e.node_id == "w1"]
        start = next(e.at for e in mine if e.state == "accepted")
        end = next(e.at for e in mine if e.state in ("completed", "failed", "verified", "rejected"))
        held.append((start, end))
    held.sort()
    for (_, end), (start, _) in itertools.pairwise(held):
        assert start >= end, f"w1 ran two jobs at once: {held}"


async def _exited(stack: Devstack, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while stack.services[name].proc is not None and stack.services[name].proc.poll() is None:
        assert time.monotonic() < deadline, f"{name} did not reach its crash point"
        await asyncio.sleep(0.2)


async def test_a_verifier_killed_between_deciding_and_publishing_publishes_on_restart(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=3, role_env={"verifier": {"BACQ_CRASH_AT": "verifier.decided"}})
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit(DETERMINISTIC)
        await _exited(stack, "verifier")
        assert not (await client.job(job_id)).final  # decided, never published
        stack.services["verifier"].env.pop("BACQ_CRASH_AT")
        stack.restart("verifier")
        job = await client.wait(job_id, timeout=120)
    assert job.state == JobState.ACCEPTED, job.reason


async def test_a_requester_killed_after_choosing_workers_assigns_them_on_restart(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=3, role_env={"requester": {"BACQ_CRASH_AT": "requester.assigned"}})
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit(DETERMINISTIC)
        await _exited(stack, "requester")
        job = await client.job(job_id)
        # the choice is committed; no worker heard of it
        assert len(job.executions_in(ExecState.ACCEPTED)) == 3, job.executions
        stack.services["requester"].env.pop("BACQ_CRASH_AT")
        stack.restart("requester")
        job = await client.wait(job_id, timeout=120)
    assert job.state == JobState.ACCEPTED, job.reason


async def test_a_verdict_stream_takes_no_message_from_a_worker(
    make_stack: Callable[..., Devstack],
) -> None:
    """Verdicts live in a stream of their own: a worker's dedup ids cannot touch them."""
    stack = make_stack(workers=0)
    bus = await Bus.connect(
        stack.nats.url, name="bacq-requester-test", options=stack.nats_options("requester")
    )
    try:
        info = await bus.js.stream_info(subjects.VERDICTS_STREAM)
        assert info.config.subjects == [subjects.VERDICT_ALL]
        main = await bus.js.stream_info(subjects.STREAM)
        assert subjects.VERDICT_ALL not in (main.config.subjects or [])
    finally:
        await bus.close()


async def test_a_reveal_that_does_not_match_its_commitment_is_rejected_and_counted(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=3, role_env={"w3": {"BACQ_WORKER_SWITCH_REVEAL": "1"}})
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job = await client.wait(await client.submit(DETERMINISTIC), timeout=120)
        assert job.state == JobState.ACCEPTED, job.reason
        assert job.executions["w3"].state == ExecState.REJECTED
        assert "did not match its commitment" in (job.executions["w3"].error or "")
        assert {job.executions[n].state for n in ("w1", "w2")} == {ExecState.VERIFIED}
        await _eventually_reputation(client, "w3", lambda r: r.bad_reveals >= 1)


async def test_an_input_over_the_workers_limit_is_refused_before_it_is_downloaded(
    make_stack: Callable[..., Devstack], tmp_path: Path
) -> None:
    stack = make_stack(workers=1, worker_args=["--max-input-size", "1m"])
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * 1024**2))
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        storage = await Storage.connect(stack.ipfs_api)
        try:
            cid = await storage.add(big)
        finally:
            await storage.close()
        job = await client.wait(
            await client.submit({**HELLO, "inputs": [{"cid": cid, "path": "/in/big.bin"}]}),
            timeout=120,
        )
    assert job.state == JobState.FAILED
    error = job.executions["w1"].error or job.reason
    assert cid in error, error
    assert "nothing was downloaded" in error, error
