"""The durable lifecycle: lost workers, restarts of NATS and the requester, cancel, idempotency,
drains, deadlines, and the tamper-evident history. All on real nats-server, dockerd and kubo."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Callable

from bacq import subjects
from bacq.bus import Bus
from bacq.client import Client
from bacq.devstack import Devstack
from bacq.events import Event, encode_events, verify_chain
from bacq.models import Assignment, AssignmentReply, JobRecord, decode
from bacq.states import ExecState, JobState
from tests.conftest import run_cli
from tests.scenarios import BUSYBOX

DEVSTACK = {"workers": 1}


def sleeper(seconds: float, **fields: object) -> dict[str, object]:
    return {"image": BUSYBOX, "command": ["sh", "-c", f"sleep {seconds}; echo done"], **fields}


async def running_on(client: Client, job_id: str, timeout: float = 60) -> list[str]:
    """Wait until the job's container runs somewhere; return the nodes running it."""
    async with asyncio.timeout(timeout):
        while True:
            job = await client.job(job_id)
            nodes = [e.node_id for e in job.executions.values() if e.state == ExecState.RUNNING]
            if nodes:
                return nodes
            assert not job.final, f"{job.state}: {job.reason}"
            await asyncio.sleep(0.2)


def containers_of(job_id: str) -> list[str]:
    done = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=bacq.job={job_id}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def contiguous(events: list[Event]) -> bool:
    return [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_worker_killed_mid_job_is_requeued_on_another_worker(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=2)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit(sleeper(5))
        (victim,) = await running_on(client, job_id)
        stack.kill(victim)  # kill -9: no goodbye
        job = await client.wait(job_id, timeout=120)
        assert job.state == JobState.ACCEPTED, job.reason
        assert job.executions[victim].state == ExecState.LOST
        (winner,) = [n for n, e in job.executions.items() if e.state == ExecState.VERIFIED]
        assert winner != victim
        history = await client.history(job_id)
    assert verify_chain(history) is None
    states = [(e.node_id, e.state) for e in history if e.kind == "execution"]
    lost_at = states.index((victim, "lost"))
    assert (winner, "accepted") in states[lost_at:]
    assert "stopped sending heartbeats during running" in (history[lost_at].error or "") or any(
        "stopped sending heartbeats" in (e.error or "") for e in history
    )


async def test_a_worker_restarted_mid_job_within_lost_after_loses_it_to_another_worker(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=2)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit(sleeper(8))
        (victim,) = await running_on(client, job_id)
        await asyncio.to_thread(stack.kill, victim)
        await asyncio.to_thread(stack.restart, victim)  # back before it misses a heartbeat
        job = await client.wait(job_id, timeout=120)
    assert job.state == JobState.ACCEPTED, job.reason
    lost = job.executions[victim]
    assert lost.state == ExecState.LOST
    assert lost.error == f"worker {victim} restarted and no longer runs the job"


async def test_nats_restart_mid_run_loses_no_job_and_no_event(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=2)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        ids = [await client.submit(sleeper(4, concurrency=2)) for _ in range(3)]
        await running_on(client, ids[0])
        stack.restart_nats()  # same port, same store dir
        jobs = [await client.wait(job_id, timeout=180) for job_id in ids]
        histories = [await client.history(job_id) for job_id in ids]
    assert [j.state for j in jobs] == [JobState.ACCEPTED] * 3, [j.reason for j in jobs]
    for history in histories:
        assert contiguous(history)
        assert verify_chain(history) is None
        assert history[-1].state == "accepted"


async def test_requester_killed_mid_run_finishes_its_jobs_when_started_again(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=2)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        running = await client.submit(sleeper(4))
        await running_on(client, running)
        stack.kill("requester")
        await asyncio.sleep(2)  # the worker finishes while nobody listens
        stack.restart("requester")
        job = await client.wait(running, timeout=120)
        assert job.state == JobState.ACCEPTED, job.reason
        assert contiguous(await client.history(running))


async def all_completed(client: Client, job_id: str) -> JobRecord:
    """The job once every execution says completed (each worker sent its result first)."""
    async with asyncio.timeout(120):
        while True:
            job = await client.job(job_id)
            if job.executions and all(
                e.state == ExecState.COMPLETED for e in job.executions.values()
            ):
                return job
            assert not job.final, f"{job.state}: {job.reason}"
            await asyncio.sleep(0.2)


async def completed_without_verifier(client: Client, stack: Devstack, seconds: float) -> JobRecord:
    """A job of two workers (commit-reveal) that both ran to the end while no verifier runs:
    their results (commitments) are in, nobody has asked for the reveals."""
    job_id = await client.submit(sleeper(seconds, concurrency=2))
    await running_on(client, job_id)
    stack.kill("verifier")
    return await all_completed(client, job_id)


async def agreed_once_verifier_is_back(client: Client, stack: Devstack, job_id: str) -> JobRecord:
    """Start the verifier again; the job, once final, accepted with both results agreeing."""
    await asyncio.to_thread(stack.restart, "verifier")
    job = await client.wait(job_id, timeout=120)
    assert job.state == JobState.ACCEPTED, job.reason
    assert job.reason == "2 of 2 results agree"
    return job


async def test_verifier_killed_between_results_still_gives_one_verdict(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=2)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        down = await completed_without_verifier(client, stack, 3)
        job_id = down.id
        assert down.state in (JobState.RUNNING, JobState.VERIFYING)  # no verdict without it
        assert not any(
            e.kind == "job" and e.state == "accepted" for e in await client.history(job_id)
        )
        await agreed_once_verifier_is_back(client, stack, job_id)
        history = await client.history(job_id)
    assert sum(1 for e in history if e.kind == "job" and e.state == "accepted") == 1


async def test_worker_restarted_between_commitment_and_reveal_still_reveals(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=2)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = (await completed_without_verifier(client, stack, 1)).id
        stack.kill("w1")  # kill -9: what it kept in memory is gone, what it kept on disk is not
        await asyncio.to_thread(stack.restart, "w1")
        await agreed_once_verifier_is_back(client, stack, job_id)


async def test_an_assignment_sent_again_after_the_commitment_does_not_run_the_job_twice(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=2)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job = await completed_without_verifier(client, stack, 1)
        job_id = job.id
        # a requester that restarted before it heard how the job went sends the assignment
        # again (Requester._resume): as it does, with its credentials
        requester = await Bus.connect(
            stack.nats.url, name="bacq-requester-again", options=stack.nats_options("requester")
        )
        try:
            again = Assignment(job_id=job_id, accepted=True, spec=job.spec)
            reply = await requester.request(
                subjects.assign("w1"), again, AssignmentReply, timeout=10
            )
        finally:
            await requester.close()
        assert reply.ok, reply.error
        # run once: the reveal matches the one commitment the verifier holds
        await agreed_once_verifier_is_back(client, stack, job_id)
    lines = [json.loads(line) for line in stack.services["w1"].log_path.read_text().splitlines()]
    mine = [line["event"] for line in lines if line.get("job") == job_id]
    assert mine.count("job.accepted") == 1, mine
    assert mine.count("job.assigned_again") == 1, mine


async def test_only_capable_worker_disappearing_fails_the_job_with_a_reason(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=1, worker_labels={"gpu": "true"})
    stack.add_worker(1, labels={})  # w2: alive, but without the label
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit(sleeper(300, node_selector={"gpu": "true"}, bid_timeout=3))
        await running_on(client, job_id)
        stack.kill("w1")
        job = await client.wait(job_id, timeout=90)  # no infinite wait
    assert job.state == JobState.FAILED
    assert "worker w1 stopped sending heartbeats during running" in job.reason
    assert "0 of 1 live workers have the label gpu=true" in job.reason


async def test_duplicate_submission_with_the_same_idempotency_key_makes_one_job(
    stack: Devstack,
) -> None:
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        spec = {"image": BUSYBOX, "command": ["true"]}
        first, second, *rest = await asyncio.gather(
            *(client.submit(spec, idempotency_key="nightly-2026-11-24") for _ in range(4))
        )
        assert {first, second, *rest} == {first}
        other = await client.submit(spec, idempotency_key="nightly-2026-11-25")
        assert other != first
        keyed = [j for j in await client.jobs() if j.idempotency_key == "nightly-2026-11-24"]
        assert [j.id for j in keyed] == [first]


async def test_cancel_during_run_removes_containers_and_frees_capacity(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=1, max_jobs=1)  # one slot: a leak would block the next job
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit(sleeper(300))
        await running_on(client, job_id)
        assert containers_of(job_id)
        done = run_cli(stack, "cancel", job_id)
        assert done.returncode == 0, done.stderr
        assert "stopped on: w1" in done.stdout
        job = await client.job(job_id)
        assert job.state == JobState.CANCELLED
        assert job.executions["w1"].state == ExecState.CANCELLED
        assert containers_of(job_id) == []
        follow_up = await client.wait(await client.submit(sleeper(0, bid_timeout=5)), timeout=60)
        assert follow_up.state == JobState.ACCEPTED, follow_up.reason
        again = run_cli(stack, "cancel", job_id)
        assert again.returncode == 1
        assert "already ended: cancelled" in again.stderr


async def test_worker_sigterm_drains_its_running_job_before_exiting(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=2)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit(sleeper(3))
        (node,) = await running_on(client, job_id)
        await asyncio.to_thread(stack.stop_service, node)  # returns once the worker exited
        job = await client.job(job_id)
        assert job.executions[node].state in (ExecState.COMPLETED, ExecState.VERIFIED)
        job = await client.wait(job_id, timeout=60)
        assert job.state == JobState.ACCEPTED


async def test_history_verify_names_an_event_altered_in_the_stream(stack: Devstack) -> None:
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit({"image": BUSYBOX, "command": ["true"]})
        await client.wait(job_id, timeout=60)
    assert run_cli(stack, "history", job_id, "--verify").returncode == 0

    # an insider (the requester's credentials) rewrites event 3: deletes the message that holds
    # it (one commit's events) and publishes an edited copy of that message
    insider = stack.nats_options("requester")
    async with await Client.connect(stack.nats.url, options=insider) as client:
        js = client.bus.js
        messages: dict[int, list[Event]] = {}
        async for stream_seq, event in client.bus.replay_events(f"bacq.events.{job_id}"):
            messages.setdefault(stream_seq, []).append(event)
        (stream_seq,) = [n for n, events in messages.items() if any(e.seq == 3 for e in events)]
        forged = [
            e.model_copy(update={"actor": "w9"}) if e.seq == 3 else e for e in messages[stream_seq]
        ]
        await js.delete_msg("BACQ_EVENTS", stream_seq)
        await js.publish(f"bacq.events.{job_id}", encode_events(forged))

    done = run_cli(stack, "history", job_id, "--verify")
    assert done.returncode == 1
    assert "event 3 was altered" in done.stdout


async def test_events_replays_every_job_from_a_sequence(stack: Devstack) -> None:
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit({"image": BUSYBOX, "command": ["true"]})
        await client.wait(job_id, timeout=60)
    done = run_cli(stack, "events", "--from-seq", "1", "--output", "json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    mine = [e for e in lines if e["job_id"] == job_id]
    assert [e["seq"] for e in mine] == list(range(1, len(mine) + 1))
    assert mine[0]["kind"] == "submitted"
    assert mine[-1]["state"] == "accepted"
    assert all({"stream_seq", "at", "actor", "hash", "prev_hash"} <= set(e) for e in mine)
    since = run_cli(stack, "events", "--since", "10m")
    assert job_id in since.stdout


async def test_a_record_behind_its_events_is_rolled_forward_on_restart(
    stack: Devstack,
) -> None:
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit({"image": BUSYBOX, "command": ["true"]})
        final = await client.wait(job_id, timeout=60)
        history = await client.history(job_id)
    # the requester died after publishing the last events but before saving the record: the
    # record stops at the job's last "running" event, whatever its number
    (running,) = [e for e in history if e.kind == "job" and e.state == "running"][-1:]
    assert running.seq < final.event_seq  # later events exist to roll forward to
    stale = final.model_copy(
        update={
            "state": JobState.RUNNING,
            "event_seq": running.seq,
            "last_hash": running.hash,
            "result_cid": None,
        }
    )
    insider = stack.nats_options("requester")  # only the requester may write job records
    async with await Client.connect(stack.nats.url, options=insider) as client:
        await client.bus.save_job(stale)
        assert (await client.job(job_id)).event_seq == running.seq
        await asyncio.to_thread(stack.restart, "requester")
        entry = await client.bus.jobs.get(job_id)
        rebuilt = decode(JobRecord, entry.value or b"")
    assert rebuilt.state == JobState.ACCEPTED
    assert rebuilt.result_cid == final.result_cid
    assert rebuilt.event_seq == final.event_seq


async def test_services_stop_on_sigterm_even_with_nats_gone(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=1, kubo_nodes=1)
    await asyncio.to_thread(stack.nats.stop)
    procs = {name: stack.services[name].proc for name in ("requester", "verifier", "w1")}
    for proc in procs.values():
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
    for name, proc in procs.items():
        assert proc is not None
        code = await asyncio.to_thread(proc.wait, 60)
        assert code == 0, f"{name} exited with {code}"
