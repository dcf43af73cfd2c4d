"""JetStream publishes with their acknowledgements on one inbox (``bacq._jspublish``), and the
record and event writes built on them (``Bus.save_jobs``, ``Bus.publish_durable_many``,
``Bus.publish_events_many``), against a real nats-server: acknowledgements match their messages,
duplicates and compare-and-set conflicts are told apart from a retry of our own, a job's history
only grows from its end, a missing stream or a silent listener is an error the callers already
retry."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg

from bacq import subjects
from bacq.bus import Bus
from bacq.errors import Fenced
from bacq.events import Event, encode_events
from bacq.models import CancelReply, CancelRequest, JobRecord, decode, encode, new_job_id
from bacq.spec import parse_spec

STREAM, SUBJECTS = "ACKTEST", "acktest.>"


@pytest.fixture
def bus(scratch_bus: Bus) -> Bus:
    return scratch_bus


def _job() -> JobRecord:
    return JobRecord(id=new_job_id(), spec=parse_spec({"image": "busybox", "command": ["true"]}))


async def test_a_batch_gets_each_message_its_own_acknowledgement_in_order(bus: Bus) -> None:
    acks = await bus.acks.publish_many(
        [(f"acktest.{i % 5}", str(i).encode(), {"Nats-Msg-Id": f"m{i}"}) for i in range(300)],
        timeout=10,
    )
    assert all(a.ok and not a.duplicate for a in acks)
    assert [a.seq for a in acks] == sorted(a.seq for a in acks)
    assert len({a.seq for a in acks}) == 300
    stored = await bus.js.get_msg(STREAM, acks[123].seq)
    assert stored.data == b"123"


async def test_a_repeated_message_id_is_stored_once_and_reported(bus: Bus) -> None:
    messages = [(f"acktest.d{i}", b"x", f"dup-{i}") for i in range(20)]
    assert await bus.publish_durable_many(messages) == [True] * 20
    assert await bus.publish_durable_many(messages[5:8]) == [False] * 3
    info = await bus.js.stream_info(STREAM)
    assert info.state.messages == 20


async def test_no_stream_and_no_answer_are_the_errors_nats_py_raises(bus: Bus) -> None:
    (ack,) = await bus.acks.publish_many([("nostream.here", b"x", None)], timeout=5)
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        ack.raise_for()
    silent = await bus.nc.subscribe("silent.listener")  # takes the message, never answers
    try:
        (ack,) = await bus.acks.publish_many([("silent.listener", b"x", None)], timeout=0.3)
        with pytest.raises(nats.errors.TimeoutError):
            ack.raise_for()
    finally:
        await silent.unsubscribe()


async def test_records_are_saved_together_and_a_stale_revision_is_fenced(bus: Bus) -> None:
    jobs = [_job() for _ in range(50)]
    revisions = await bus.save_jobs([(job, 0) for job in jobs])
    assert all(r > 0 for r in revisions)
    loaded = await bus.load_job_entry(jobs[7].id)
    assert loaded is not None
    assert loaded[1] == revisions[7]
    # the next write of each on the revision it knows
    for job in jobs:
        job.reason = "changed"
    again = await bus.save_jobs(list(zip(jobs, revisions, strict=True)))
    assert all(b > a for a, b in zip(revisions, again, strict=True))
    # someone else (another requester) writes one record: our next write of it is refused
    await bus.jobs.put(jobs[3].id, b'{"not": "ours"}')
    jobs[3].reason = "late"
    with pytest.raises(Fenced, match=jobs[3].id):
        await bus.save_jobs([(jobs[3], again[3])])


async def test_our_own_write_repeated_after_a_lost_acknowledgement_is_no_conflict(
    bus: Bus,
) -> None:
    job = _job()
    first = await bus.save_job(job, revision=0)
    # the same write again on the revision before it (its acknowledgement was lost): the
    # record holds exactly this already, so it is ours and no other requester's
    assert await bus.save_job(job, revision=0) == first


async def test_a_value_is_put_into_a_bucket(bus: Bus) -> None:
    revision = await bus.put_value(subjects.RESULTS_BUCKET, "j-acktest", b"collected")
    results = await bus.js.key_value(subjects.RESULTS_BUCKET)
    entry = await results.get("j-acktest")
    assert entry.value == b"collected"
    assert entry.revision == revision


async def test_a_value_is_read_with_its_revision_and_a_deleted_one_is_none(bus: Bus) -> None:
    assert await bus.get_value(subjects.RESULTS_BUCKET, "j-never-written") is None
    revision = await bus.put_value(subjects.RESULTS_BUCKET, "j-readback", b"first")
    assert await bus.get_value(subjects.RESULTS_BUCKET, "j-readback") == (b"first", revision)
    results = await bus.js.key_value(subjects.RESULTS_BUCKET)
    await results.delete("j-readback")
    assert await bus.get_value(subjects.RESULTS_BUCKET, "j-readback") is None
    with pytest.raises(nats.js.errors.NotFoundError):  # no such bucket: not "no value"
        await bus.get_value("no-such-bucket", "key")


async def test_a_conflict_in_a_batch_still_reports_the_records_that_were_saved(bus: Bus) -> None:
    jobs = [_job() for _ in range(5)]
    revisions = await bus.save_jobs([(job, 0) for job in jobs])
    await bus.jobs.put(jobs[2].id, b'{"not": "ours"}')  # another requester's write
    saved: dict[str, int] = {}
    for job in jobs:
        job.reason = "next"
    with pytest.raises(Fenced):
        await bus.save_jobs(list(zip(jobs, revisions, strict=True)), on_saved=saved.__setitem__)
    assert set(saved) == {job.id for i, job in enumerate(jobs) if i != 2}
    for job in jobs[:2] + jobs[3:]:
        loaded = await bus.load_job_entry(job.id)
        assert loaded is not None
        assert loaded[1] == saved[job.id]


def _events(job_id: str, first: int, last: int, state: str = "pending") -> list[Event]:
    return [
        Event(job_id=job_id, seq=seq, actor="requester", kind="job", state=state)
        for seq in range(first, last + 1)
    ]


async def test_a_late_events_message_after_the_history_moved_on_is_refused(bus: Bus) -> None:
    job_id = new_job_id()
    first = await bus.publish_events(_events(job_id, 1, 1), after=0)
    second = await bus.publish_events(_events(job_id, 2, 3), after=first)
    assert second > first
    # a deposed requester's message, decided before the other wrote seq 2, arrives late: it
    # chains to the same message (a different seq range, so another message id) and is refused
    with pytest.raises(Fenced, match=job_id):
        await bus.publish_events(_events(job_id, 2, 2, state="cancelled"), after=first)
    # … as is one for a job the stream knows nothing of yet, but which claims a history
    with pytest.raises(Fenced):
        await bus.publish_events(_events(new_job_id(), 5, 5), after=first)
    history = [e.seq async for _, e in bus.replay_events(subjects.events(job_id))]
    assert history == [1, 2, 3]


async def test_our_own_events_message_sent_again_is_no_conflict(bus: Bus) -> None:
    job_id = new_job_id()
    first = await bus.publish_events(_events(job_id, 1, 1), after=0)
    events = _events(job_id, 2, 2)
    second = await bus.publish_events(events, after=first)
    # sent again (its acknowledgement was lost): the end of the history holds exactly these
    # bytes (the server checks the expected sequence before the message id)
    assert await bus.publish_events(events, after=first) == second
    other = new_job_id()
    events = _events(other, 1, 1)
    ack = await bus.js.publish(subjects.events(other), encode_events(events))
    assert await bus.publish_events(events, after=0) == ack.seq
    assert await bus.last_events(other) is not None
    assert await bus.last_events(new_job_id()) is None


async def test_events_of_many_jobs_report_those_stored_before_a_conflict(bus: Bus) -> None:
    jobs = [new_job_id() for _ in range(4)]
    firsts = await bus.publish_events_many([(_events(j, 1, 1), 0) for j in jobs])
    await bus.publish_events(_events(jobs[1], 2, 2, state="cancelled"), after=firsts[1])
    stored: dict[str, int] = {}
    with pytest.raises(Fenced, match=jobs[1]):
        await bus.publish_events_many(
            [(_events(j, 2, 2), after) for j, after in zip(jobs, firsts, strict=True)],
            on_stored=stored.__setitem__,
        )
    assert set(stored) == {jobs[0], jobs[2], jobs[3]}
    for job_id in stored:
        last = await bus.last_events(job_id)
        assert last is not None
        assert (last[0][-1].seq, last[1]) == (2, stored[job_id])


async def test_a_request_is_answered_on_the_inbox_and_nobody_listening_is_no_responders(
    bus: Bus,
) -> None:
    async def answer(msg: Msg) -> None:
        await msg.respond(
            encode(CancelReply(ok=True, error=decode(CancelRequest, msg.data).job_id))
        )

    listener = await bus.nc.subscribe("reqtest.answers", cb=answer)
    try:
        reply = await bus.request(
            "reqtest.answers", CancelRequest(job_id="j-asked"), CancelReply, timeout=5
        )
        assert reply.ok
        assert reply.error == "j-asked"
        with pytest.raises(nats.errors.NoRespondersError):
            await bus.request("nobody.listens", CancelRequest(job_id="j"), CancelReply, timeout=5)
        silent = await bus.nc.subscribe("reqtest.silent")
        with pytest.raises(nats.errors.TimeoutError):
            await bus.request("reqtest.silent", CancelRequest(job_id="j"), CancelReply, timeout=0.3)
        await silent.unsubscribe()
    finally:
        await listener.unsubscribe()
