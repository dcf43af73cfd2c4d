"""Job events: every state change as a hash-chained record, and the job record folded from them.

Pure logic; touches nothing. The requester turns each change of a job record into events
(``diff``), chains them (each carries the hash of the job's previous event) and signs them with its
key (``seal``, see ``bacq.signing``), publishes them to the ``BACQ_EVENTS`` stream before it saves
the record, and can rebuild a record from its events (``fold``). ``verify_chain`` checks a job's
chain and names the first broken link; ``verify_history`` checks everything a reader can: the
chain, every signature against the trusted requester keys, the stream order, and that the history
ends where the job record says it does (``event_seq``, ``last_hash``), so that events removed from
the end, reordered, or forged by someone without the requester's key are all reported.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from bacq.models import GENESIS, Execution, JobRecord, now
from bacq.signing import Signer, signature_valid
from bacq.spec import JobSpec
from bacq.states import ExecState, JobState

__all__ = [
    "GENESIS",
    "Event",
    "HistoryCheck",
    "decode_events",
    "diff",
    "encode_events",
    "fold",
    "seal",
    "verify_chain",
    "verify_history",
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
    key: str | None = None  # the public nkey that signed it (part of the hash); None: unsigned
    sig: str | None = None  # that key's ed25519 signature of ``hash`` (base64); not hashed

    def digest(self) -> str:
        # an unsigned event hashes as before signing existed, so older histories still verify
        body = self.model_dump(
            mode="json", exclude={"hash", "sig"} if self.key else {"hash", "sig", "key"}
        )
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


def seal(events: list[Event], prev_hash: str, signer: Signer | None = None) -> list[Event]:
    """Chain ``events`` after ``prev_hash``: set each one's prev_hash and hash, in order, and with
    a ``signer`` its key, and the last one its signature, which covers the others through the
    chain (without a signer the events are unsigned, and ``verify_history`` says so)."""
    for event in events:
        event.prev_hash = prev_hash
        event.key = signer.key_id if signer is not None else None
        event.sig = None
        event.hash = event.digest()
        prev_hash = event.hash
    # one signature per commit, on its last event: each hash covers the one before it, so the
    # signature vouches for the whole commit (and every event carries the key in its hash)
    if signer is not None and events:
        events[-1].sig = signer.sign_hash(events[-1].hash)
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


@dataclass
class HistoryCheck:
    """What ``verify_history`` found in one job's history: ``problems`` (empty: it verifies),
    each one sentence naming the events and what is wrong with them."""

    job_id: str
    events: int  # events read
    problems: list[str] = field(default_factory=list)
    signers: list[str] = field(default_factory=list)  # keys that signed, in order of first use
    unsigned: int = 0  # events without a signature
    newer: int = 0  # signed events after the record's last one (the record is being saved)
    anchor: int = 0  # the record's last event (event_seq): where the history must pass through

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line for a history that verifies."""
        text = f"{self.events} events, each chained to the one before it"
        if self.anchor:
            text += f"; event {self.anchor} is the job record's last"
        if self.newer:
            text += f" ({self.newer} newer, not yet in the record)"
        if self.signers:
            text += "; signed by " + ", ".join(self.signers)
        if self.unsigned:
            text += f"; {self.unsigned} NOT signed"
        return text


_MAX_RANGES = 8  # seq ranges named in one problem


def _seqs(seqs: Iterable[int]) -> str:
    """``[1, 2, 3, 5]`` → ``events 1-3, 5``; ``[4]`` → ``event 4``."""
    ordered = sorted(set(seqs))
    ranges: list[str] = []
    start = prev = ordered[0]
    for seq in [*ordered[1:], None]:
        if seq is not None and seq == prev + 1:
            prev = seq
            continue
        ranges.append(str(start) if start == prev else f"{start}-{prev}")
        if seq is not None:
            start = prev = seq
    more = f" and {len(ranges) - _MAX_RANGES} more ranges" if len(ranges) > _MAX_RANGES else ""
    word = "event" if len(ordered) == 1 else "events"
    return f"{word} {', '.join(ranges[:_MAX_RANGES])}{more}"


def verify_history(
    events: list[Event],
    record: JobRecord,
    trusted_keys: Collection[str],
    *,
    require_signatures: bool = True,
) -> HistoryCheck:
    """Check one job's history as read from the stream (``events`` in stream order) against its
    job ``record`` and the requester keys a reader trusts.

    Reported: an event stored out of order (reordered), a duplicate seq, a gap, a broken link or
    an event whose content does not match its hash (the chain); an event signed by a key that is
    not trusted, or whose signature does not match (forged: a valid chain is not enough); an
    unsigned event (when ``require_signatures``, and always after a signed one: nobody but the
    requester writes after it has begun signing); a history that does not reach the record's last
    event or passes through another one there (truncated, rewritten). Events after the record's
    last one are fine when they chain and verify: the requester publishes events before it saves
    the record, so a record may lag its history for a moment.
    """
    check = HistoryCheck(job_id=record.id, events=len(events), anchor=record.event_seq)
    problems = check.problems
    trusted = set(trusted_keys)

    strangers = [e.seq for e in events if e.job_id != record.id]
    if strangers:
        problems.append(f"{_seqs(strangers)} belong to another job: the history was altered")
    highest, late = 0, []
    for event in events:
        if event.seq < highest:
            late.append(event.seq)
        highest = max(highest, event.seq)
    if late:
        problems.append(f"{_seqs(late)} stored after later ones: the history was reordered")

    # the chain, by seq
    chain: dict[int, Event] = {}
    prev: Event | None = None
    for event in sorted(events, key=lambda e: e.seq):
        if event.seq in chain:
            problems.append(f"event {event.seq} appears more than once: the history was altered")
            continue
        chain[event.seq] = event
        expected = prev.seq + 1 if prev is not None else 1
        if event.seq != expected:
            missing = range(expected, event.seq) if event.seq > expected else [event.seq]
            problems.append(f"{_seqs(missing)} missing (next is {event.seq})")
        elif event.prev_hash != (prev.hash if prev is not None else GENESIS):
            problems.append(
                f"event {event.seq} does not follow event {event.seq - 1}: the chain is broken"
            )
        if event.digest() != event.hash:
            problems.append(f"event {event.seq} was altered: its content does not match its hash")
        prev = event

    # the signatures
    unsigned: list[int] = []
    late_unsigned: list[int] = []
    untrusted: dict[str, list[int]] = {}
    forged: list[int] = []
    # a signed event vouches for itself and, through the chain (each hash covers the one before
    # it), for the events before it that name a key but carry no signature (the rest of its
    # commit): they are found as the signature after them is, and counted as signed by its key
    vouched: dict[int, tuple[str, str | None]] = {}  # seq → what was found, and by which key
    cover: tuple[str, str] | None = None  # the next signed event's key and what it was found
    for seq, event in sorted(chain.items(), reverse=True):
        if event.key is None:
            vouched[seq] = ("unsigned" if event.sig is None else "forged", None)
        elif event.sig is not None:
            if event.key not in trusted:
                found = "untrusted"
            elif signature_valid(event.key, event.hash, event.sig):
                found = "ok"
            else:
                found = "forged"
            vouched[seq], cover = (found, event.key), (event.key, found)
        elif cover is None:
            vouched[seq] = ("tail", None)  # names a key, but no signature comes after it
        else:
            vouched[seq] = (cover[1], cover[0])
    for seq, _event in sorted(chain.items()):
        found, by = vouched[seq]
        if found in ("unsigned", "tail"):
            (late_unsigned if check.signers else unsigned).append(seq)
            continue
        if found == "forged":
            forged.append(seq)
        elif found == "untrusted" and by is not None:
            untrusted.setdefault(by, []).append(seq)
        if by is not None and by not in check.signers:
            check.signers.append(by)
    check.unsigned = len(unsigned) + len(late_unsigned)
    if unsigned and require_signatures:
        problems.append(f"{_seqs(unsigned)} not signed: the requester signs every event it writes")
    if late_unsigned:
        problems.append(
            f"{_seqs(late_unsigned)} not signed, though earlier events are: written by someone"
            " without the requester's key"
        )
    for key, seqs in untrusted.items():
        known = ", ".join(sorted(trusted)) if trusted else "none is known"
        problems.append(
            f"{_seqs(seqs)} signed by {key}, which is not a trusted requester key"
            f" (trusted: {known}): forged, or signed by a key the requester no longer lists"
        )
    if forged:
        problems.append(
            f"{_seqs(forged)}: the signature does not match the event: forged or altered"
        )

    # the anchor: the history must pass through the record's last event
    last = record.event_seq
    if last > 0:
        highest = max(chain, default=0)
        anchor = chain.get(last)
        if not chain:
            problems.append(
                f"the history is empty but the job record's last event is {last}: it was removed"
            )
        elif anchor is None and highest < last:
            problems.append(
                f"the history ends at event {highest} but the job record's last event is {last}:"
                f" {_seqs(range(highest + 1, last + 1))} removed from the end (truncated)"
            )
        elif anchor is not None and anchor.hash != record.last_hash:
            problems.append(
                f"event {last} is not the one the job record names (hash {anchor.hash[:12]}…,"
                f" the record has {record.last_hash[:12]}…): the history was rewritten"
            )
        check.newer = sum(1 for seq in chain if seq > last)
    return check
