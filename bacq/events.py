"""Job events: every state change as a hash-chained record, and the job record folded from them.

Pure logic; touches nothing. The requester turns each change of a job record into events
(``diff``), chains them (each carries the hash of the job's previous event), publishes them to the
``BACQ_EVENTS`` stream before it saves the record, and can rebuild a record from its events
(``fold``). ``verify_chain`` checks a job's history and names the first broken link.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from bacq.models import GENESIS, Execution, JobRecord, now
from bacq.spec import JobSpec
from bacq.states import ExecState, JobState

__all__ = [
    "GENESIS",
    "Event",
    "decode_events",
    "diff",
    "encode_events",
    "fold",
    "seal",
    "verify_chain",
]


class Event(BaseModel):
    """One change of one job: the job's own state, or one execution's."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    seq: int  # per job, 1, 2, 3, … with no gaps
    at: dt.datetime = Field(default_factory=now)
    actor: str  # who caused it: "client", "requester", "verifier" or a worker's node id
    kind: Literal["submitted", "job", "execution"]
    state: str
    node_id: str | None = None
    reason: str = ""
    error: str | None = None
    exit_code: int | None = None
    result_cid: str | None = None
    spec: JobSpec | None = None  # on "submitted" only
    prev_hash: str = GENESIS
    hash: str = ""

    def digest(self) -> str:
        body = self.model_dump(mode="json", exclude={"hash"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


_EVENT_LIST: TypeAdapter[list[Event]] = TypeAdapter(list[Event])


def encode_events(events: list[Event]) -> bytes:
    """One message of the events stream: one event as an object, several (one commit) as an
    array. Either way each event keeps its own seq and hash."""
    if len(events) == 1:
        return events[0].model_dump_json().encode()
    return _EVENT_LIST.dump_json(events)


def decode_events(data: bytes) -> list[Event]:
    """The events in one message of the events stream (see ``encode_events``)."""
    if data.lstrip()[:1] == b"[":
        return _EVENT_LIST.validate_json(data)
    return [Event.model_validate_json(data)]


def seal(events: list[Event], prev_hash: str) -> list[Event]:
    """Chain ``events`` after ``prev_hash``: set each one's prev_hash and hash, in order."""
    for event in events:
        event.prev_hash = prev_hash
        event.hash = event.digest()
        prev_hash = event.hash
    return events


def _exec_reason(execution: Execution) -> str:
    return execution.error or execution.detail


def diff(before: JobRecord | None, after: JobRecord, *, actor: str) -> list[Event]:
    """The events that take ``before`` (None: a new job) to ``after``, numbered from its seq."""
    events: list[Event] = []
    seq = before.event_seq if before is not None else 0

    def add(**fields: object) -> None:
        nonlocal seq
        seq += 1
        events.append(Event(job_id=after.id, seq=seq, at=after.updated_at, **fields))

    if before is None:
        add(
            actor=actor,
            kind="submitted",
            state=after.state.value,
            spec=after.spec,
            reason=after.reason or "submitted",
        )
        before = JobRecord(id=after.id, spec=after.spec, state=after.state, reason=after.reason)
    for node_id, execution in after.executions.items():
        old = before.executions.get(node_id)
        fields = (
            execution.state,
            _exec_reason(execution),
            execution.exit_code,
            execution.result_cid,
        )
        if old is not None and fields == (
            old.state,
            _exec_reason(old),
            old.exit_code,
            old.result_cid,
        ):
            continue
        add(
            # a bid is the worker's own act; the rest is whoever caused this change
            actor=node_id if execution.state == ExecState.BID else actor,
            kind="execution",
            node_id=node_id,
            state=execution.state.value,
            reason=execution.detail,
            error=execution.error,
            exit_code=execution.exit_code,
            result_cid=execution.result_cid,
        )
    if (after.state, after.reason, after.result_cid) != (
        before.state,
        before.reason,
        before.result_cid,
    ):
        add(
            actor=actor,
            kind="job",
            state=after.state.value,
            reason=after.reason,
            exit_code=after.exit_code,
            result_cid=after.result_cid,
        )
    return events


def fold(events: list[Event]) -> JobRecord:
    """The job record that ``events`` (one job's, from its first) describe."""
    if not events or events[0].kind != "submitted" or events[0].spec is None:
        raise ValueError("a job's history starts with its 'submitted' event")
    first = events[0]
    job = JobRecord(
        id=first.job_id,
        spec=first.spec,
        state=JobState(first.state),
        reason=first.reason,
        created_at=first.at,
        updated_at=first.at,
    )
    for event in events:
        if event.kind == "execution" and event.node_id is not None:
            previous = job.executions.get(event.node_id)
            assigned_at = previous.assigned_at if previous is not None else None
            if event.state == ExecState.ACCEPTED:
                assigned_at = event.at
            job.executions[event.node_id] = Execution(
                node_id=event.node_id,
                state=ExecState(event.state),
                updated_at=event.at,
                assigned_at=assigned_at,
                detail=event.reason,
                error=event.error,
                exit_code=event.exit_code,
                result_cid=event.result_cid,
            )
        elif event.kind == "job":
            job.state = JobState(event.state)
            job.reason = event.reason
            job.result_cid = event.result_cid
            job.exit_code = event.exit_code
        job.updated_at = event.at
        job.event_seq = event.seq
        job.last_hash = event.hash
    return job


def verify_chain(events: list[Event]) -> str | None:
    """None when ``events`` (one job's, in stream order) form an unbroken chain; else the flaw."""
    prev_hash, expected = GENESIS, 1
    for event in sorted(events, key=lambda e: e.seq):
        if event.seq < expected:
            return f"event {event.seq} appears more than once: the history was altered"
        if event.seq != expected:
            return f"event {expected} is missing (next is {event.seq})"
        if event.prev_hash != prev_hash:
            return f"event {event.seq} does not follow event {event.seq - 1}: the chain is broken"
        if event.digest() != event.hash:
            return f"event {event.seq} was altered: its content does not match its hash"
        prev_hash, expected = event.hash, expected + 1
    return None
