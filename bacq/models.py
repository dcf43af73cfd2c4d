"""The messages that travel between bacq processes, and the job record. Touches nothing.

Every message is a pydantic model serialised as JSON; ``encode``/``decode`` are the only codecs.
The subjects they travel on are in ``bacq.subjects``; the states they carry in ``bacq.states``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from bacq.spec import JobSpec
from bacq.states import JOB_FINAL, ExecState, JobState

__all__ = [
    "GENESIS",
    "REVEAL_BATCH_MAX",
    "Announcement",
    "Assignment",
    "AssignmentReply",
    "Bid",
    "CancelReply",
    "CancelRequest",
    "ExecUpdate",
    "Execution",
    "JobRecord",
    "NodeInfo",
    "NodeVerdict",
    "Problem",
    "ReleaseReply",
    "ReleaseRequest",
    "Reputation",
    "ResultMessage",
    "RevealReply",
    "RevealRequest",
    "SubmitManyReply",
    "SubmitManyRequest",
    "SubmitReply",
    "SubmitRequest",
    "Verdict",
    "commit_reveal",
    "commitment_of",
    "decode",
    "encode",
    "new_job_id",
    "now",
]

M = TypeVar("M", bound=BaseModel)


GENESIS = "0" * 64  # the "previous hash" of a job's first event (see bacq.events)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_job_id() -> str:
    return "j-" + uuid.uuid4().hex[:20]


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()


def decode(model: type[M], data: bytes) -> M:
    return model.model_validate_json(data)


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", defer_build=True)


class Problem(_Msg):
    field: str
    message: str


class SubmitRequest(_Msg):
    spec: dict[str, object]
    idempotency_key: str | None = None  # a retry with the same key returns the same job


class SubmitManyRequest(_Msg):
    """Many submissions in one request (``bacq.api.submit_many``), answered in the same order."""

    specs: list[dict[str, object]]
    # one per spec (None: no key); a retry of the whole batch with the same keys submits once
    idempotency_keys: list[str | None] | None = None
    # one for the whole batch (cheaper than a key per spec): a retry of the same batch with the
    # same key gets the same job ids, and a spec the first attempt did not record is recorded
    batch_key: str | None = Field(default=None, max_length=200)


class CancelRequest(_Msg):
    job_id: str


class CancelReply(_Msg):
    ok: bool
    state: str | None = None
    error: str | None = None
    stopped: list[str] = Field(default_factory=list)  # workers told to stop


class SubmitReply(_Msg):
    job_id: str | None = None
    error: str | None = None
    problems: list[Problem] = Field(default_factory=list)


class SubmitManyReply(_Msg):
    """One ``SubmitReply`` per submitted spec, in order; ``error`` when the batch as a whole was
    refused (too many specs, malformed request)."""

    results: list[SubmitReply] = Field(default_factory=list)
    error: str | None = None


class Announcement(_Msg):
    job_id: str
    spec: JobSpec
    bid_deadline: dt.datetime
    # the workers invited to bid (the requester picked those with free slots); None: anyone
    nodes: list[str] | None = None


class Bid(_Msg):
    job_id: str
    node_id: str
    labels: dict[str, str] = Field(default_factory=dict)
    running: int = 0


class Assignment(_Msg):
    job_id: str
    accepted: bool
    spec: JobSpec | None = None
    reason: str = ""


class AssignmentReply(_Msg):
    ok: bool
    error: str | None = None


class ExecUpdate(_Msg):
    job_id: str
    node_id: str
    state: ExecState
    at: dt.datetime = Field(default_factory=now)
    detail: str = ""
    exit_code: int | None = None
    error: str | None = None
    fuel_used: int | None = None  # wasm jobs: the fuel the module used (a reproducible cost)


class ResultMessage(_Msg):
    """Sent on the verification subject, in two steps (commit, then reveal), or once: an error.

    - commit: ``commitment`` = ``commitment_of(cid, exit_code, node, nonce)``, nothing else. The
      worker has computed its result folder's CID without publishing any block of it.
    - reveal: once the verifier asks (every chosen worker has committed), ``cid``, ``exit_code``
      and ``nonce``; the folder is now in IPFS. A reveal that does not match the commitment is
      rejected and counted against the node.
    - error: ``error`` (the job failed on this worker; it reveals nothing).
    """

    job_id: str
    node_id: str
    cid: str | None = None
    error: str | None = None
    exit_code: int | None = None
    commitment: str | None = None
    nonce: str | None = None
    fuel_used: int | None = None  # wasm jobs: the fuel the module used

    @property
    def kind(self) -> Literal["commit", "reveal", "error"]:
        if self.error is not None:
            return "error"
        return "commit" if self.commitment is not None else "reveal"


def commitment_of(cid: str, exit_code: int | None, node_id: str, nonce: str) -> str:
    """What a worker commits to before it may learn anything of the others' results."""
    text = f"bacq-commit-v1|{cid}|{exit_code}|{node_id}|{nonce}"
    return hashlib.sha256(text.encode()).hexdigest()


def commit_reveal(spec: JobSpec) -> bool:
    """Whether a job's workers commit first and reveal when asked, or send their result at once.

    Commit-reveal keeps a worker from learning another's result before it is bound to its own:
    it matters when several workers answer one job. A job on one worker has no other answer to
    copy (a replacement for a lost worker cannot read the lost one's result: no job record or
    stream a worker may read carries it, and its blocks' CID is known to no one else), so its
    worker publishes its result and sends it in one message (a reveal nobody asked for), which
    saves the verifier a write and the job a round trip (~20 ms of `bacq run`'s time)."""
    return spec.concurrency > 1


REVEAL_BATCH_MAX = 256  # jobs one reveal request may name


class RevealRequest(_Msg):
    """The verifier asks a worker to reveal its results: ``job_ids`` (one request for several
    jobs; ``job_id`` is the first of them, for a worker that reads only that)."""

    job_id: str
    job_ids: list[str] = Field(default_factory=list, max_length=REVEAL_BATCH_MAX)


class RevealReply(_Msg):
    ok: bool
    error: str | None = None


class Reputation(_Msg):
    """What one node's messages and results earned it (bucket ``bacq-reputation``, key = node)."""

    node_id: str
    verified: int = 0  # results that matched the accepted one
    rejected: int = 0  # results outvoted by the others
    failed: int = 0  # executions that ended in an error or were lost
    forged: int = 0  # messages that spoke for another node or job than their subject
    malformed: int = 0  # messages that did not parse or fit
    bad_reveals: int = 0  # reveals that did not match their commitment, or never came
    quarantined: str | None = None  # why it is quarantined (None: it is not)
    quarantined_at: dt.datetime | None = None
    released_at: dt.datetime | None = None  # the last `bacq nodes release`
    # offences counted up to the last release: quarantine looks at what came after it
    offences_at_release: int = 0
    updated_at: dt.datetime = Field(default_factory=now)

    @property
    def offences(self) -> int:
        return self.forged + self.malformed + self.bad_reveals


class ReleaseRequest(_Msg):
    node_id: str


class ReleaseReply(_Msg):
    ok: bool
    error: str | None = None


class NodeVerdict(_Msg):
    cid: str | None = None
    error: str | None = None
    exit_code: int | None = None
    verified: bool = False
    committed: bool = False  # it committed to a result (so its error is the verifier's finding)


class Verdict(_Msg):
    job_id: str
    outcome: Literal["accepted", "void", "failed"]
    reason: str
    result_cid: str | None = None
    nodes: dict[str, NodeVerdict] = Field(default_factory=dict)
    at: dt.datetime = Field(default_factory=now)


class NodeInfo(_Msg):
    node_id: str
    labels: dict[str, str] = Field(default_factory=dict)
    cpu: float
    memory: int
    max_jobs: int
    running: int
    jobs: list[str] = Field(default_factory=list)  # ids of the jobs it runs now
    draining: bool = False
    network: bool = False  # runs jobs that ask for network access
    # when this worker process started: a job it does not list, assigned before then, was lost
    # with the previous process (None from workers that do not say)
    started_at: dt.datetime | None = None
    at: dt.datetime = Field(default_factory=now)


class Execution(_Msg):
    node_id: str
    state: ExecState
    updated_at: dt.datetime = Field(default_factory=now)
    detail: str = ""
    error: str | None = None
    exit_code: int | None = None
    result_cid: str | None = None
    assigned_at: dt.datetime | None = None  # when the requester chose this worker
    fuel_used: int | None = None  # wasm jobs: the fuel the module used (a reproducible cost)


class JobRecord(_Msg):
    id: str
    spec: JobSpec
    state: JobState = JobState.PENDING
    reason: str = ""
    created_at: dt.datetime = Field(default_factory=now)
    updated_at: dt.datetime = Field(default_factory=now)
    executions: dict[str, Execution] = Field(default_factory=dict)
    result_cid: str | None = None
    exit_code: int | None = None
    event_seq: int = 0  # the seq of the last event published for this job
    last_hash: str = GENESIS  # that event's hash: the next one chains to it
    idempotency_key: str | None = None
    deadline: dt.datetime | None = None  # results must be in by then (running, verifying)

    @property
    def final(self) -> bool:
        return self.state in JOB_FINAL

    @property
    def retries_used(self) -> int:
        """Each lost execution was replaced (or its replacement was tried) once."""
        return sum(1 for e in self.executions.values() if e.state == ExecState.LOST)

    def executions_in(self, *states: ExecState) -> list[Execution]:
        return [e for e in self.executions.values() if e.state in states]
