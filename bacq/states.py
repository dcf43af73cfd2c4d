"""The job and execution state machines: one table each, the only place transitions are defined.

Touches nothing. The requester asks ``job_can_move`` / ``exec_can_move`` before it changes a record;
an update that the table does not allow (a late or out-of-order message) is ignored and logged.

Job:        pending → bidding → running → verifying → accepted | void | failed
            bidding → pending (queued again: the workers that could run it were busy)
            (any non-final state may also end as failed or cancelled)
Execution:  bid → accepted → downloading → running → publishing → completed → verified | rejected
            bid → bid_rejected; any running state → failed | lost | cancelled;
            completed/failed → verified | rejected
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "EXEC_ACTIVE",
    "EXEC_ANSWERED",
    "EXEC_FINAL",
    "EXEC_TRANSITIONS",
    "JOB_FINAL",
    "JOB_TRANSITIONS",
    "ExecState",
    "JobState",
    "exec_can_move",
    "job_can_move",
]


class JobState(StrEnum):
    PENDING = "pending"  # accepted by the requester, queued until workers have free slots
    BIDDING = "bidding"  # announced; collecting bids
    RUNNING = "running"  # workers chosen; executions under way
    VERIFYING = "verifying"  # every chosen worker has answered; waiting for the verdict
    ACCEPTED = "accepted"  # the verifier accepted a result
    VOID = "void"  # results disagreed: no result could be accepted
    FAILED = "failed"  # the job could not run (no bids, every execution failed, deadline)
    CANCELLED = "cancelled"  # stopped on request


class ExecState(StrEnum):
    BID = "bid"  # the worker offered to run the job
    BID_REJECTED = "bid_rejected"  # the requester chose other workers (or gave up)
    ACCEPTED = "accepted"  # the requester chose this worker
    DOWNLOADING = "downloading"  # fetching inputs from IPFS
    RUNNING = "running"  # the container runs
    PUBLISHING = "publishing"  # adding the results folder to IPFS
    COMPLETED = "completed"  # a result CID went to the verifier
    FAILED = "failed"  # the execution ended in an error (sent to the verifier as such)
    VERIFIED = "verified"  # the verifier accepted this worker's result
    REJECTED = "rejected"  # the verifier outvoted this worker's result (or voided the job)
    CANCELLED = "cancelled"  # the job was cancelled or failed while this execution ran
    LOST = "lost"  # the worker stopped heartbeating or handed the job back; retried elsewhere


JOB_FINAL = frozenset({JobState.ACCEPTED, JobState.VOID, JobState.FAILED, JobState.CANCELLED})
EXEC_FINAL = frozenset(
    {
        ExecState.BID_REJECTED,
        ExecState.VERIFIED,
        ExecState.REJECTED,
        ExecState.CANCELLED,
        ExecState.LOST,
    }
)

_J = JobState
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # pending → accepted: a deterministic job answered by an equal accepted one (known answer)
    _J.PENDING: frozenset({_J.BIDDING, _J.ACCEPTED, _J.FAILED, _J.CANCELLED}),
    # back to pending (the queue) when the workers that could run it turned out busy
    _J.BIDDING: frozenset({_J.PENDING, _J.RUNNING, _J.FAILED, _J.CANCELLED}),
    # a noop verdict can arrive before every execution has reported: running may end directly
    _J.RUNNING: frozenset({_J.VERIFYING, _J.ACCEPTED, _J.VOID, _J.FAILED, _J.CANCELLED}),
    _J.VERIFYING: frozenset({_J.ACCEPTED, _J.VOID, _J.FAILED, _J.CANCELLED}),
    _J.ACCEPTED: frozenset(),
    _J.VOID: frozenset(),
    _J.FAILED: frozenset(),
    _J.CANCELLED: frozenset(),
}

_E = ExecState
_VERDICTS = frozenset({_E.VERIFIED, _E.REJECTED})
_ENDINGS = frozenset({_E.FAILED, _E.CANCELLED, _E.LOST}) | _VERDICTS
EXEC_TRANSITIONS: dict[ExecState, frozenset[ExecState]] = {
    _E.BID: frozenset({_E.ACCEPTED, _E.BID_REJECTED}),
    # progress messages may overtake each other on the bus: any later step is a legal move
    _E.ACCEPTED: frozenset({_E.DOWNLOADING, _E.RUNNING, _E.PUBLISHING, _E.COMPLETED}) | _ENDINGS,
    _E.DOWNLOADING: frozenset({_E.RUNNING, _E.PUBLISHING, _E.COMPLETED}) | _ENDINGS,
    _E.RUNNING: frozenset({_E.PUBLISHING, _E.COMPLETED}) | _ENDINGS,
    _E.PUBLISHING: frozenset({_E.COMPLETED}) | _ENDINGS,
    _E.COMPLETED: _VERDICTS | {_E.CANCELLED},
    _E.FAILED: _VERDICTS,
    _E.BID_REJECTED: frozenset({_E.BID}),  # bids again when a lost execution is retried
    _E.VERIFIED: frozenset(),
    _E.REJECTED: frozenset(),
    _E.CANCELLED: frozenset(),
    _E.LOST: frozenset(),  # a late result from a lost execution is recorded, never counted
}

# states in which a worker still holds (or will soon report) a result
EXEC_ACTIVE = frozenset({_E.ACCEPTED, _E.DOWNLOADING, _E.RUNNING, _E.PUBLISHING})
# states in which the worker has answered: its result (or error) is with the verifier
EXEC_ANSWERED = frozenset({_E.COMPLETED, _E.FAILED}) | _VERDICTS


def job_can_move(current: JobState, target: JobState) -> bool:
    return target in JOB_TRANSITIONS[current]


def exec_can_move(current: ExecState, target: ExecState) -> bool:
    return target in EXEC_TRANSITIONS[current]
