"""Pure changes to a job record, each checked against the state table. Touches nothing.

Every function returns True when it changed the record; a move the table forbids (a message that
arrived late or out of order) changes nothing and is logged by the caller.
"""

from __future__ import annotations

from bacq.models import ExecUpdate, Execution, JobRecord, Verdict, now
from bacq.states import EXEC_ACTIVE, EXEC_ANSWERED, ExecState, JobState, exec_can_move, job_can_move

__all__ = ["all_answered", "apply_exec_update", "apply_verdict", "move_exec", "move_job"]


def move_job(job: JobRecord, target: JobState, reason: str = "") -> bool:
    if job.state == target or not job_can_move(job.state, target):
        return False
    job.state = target
    if reason:
        job.reason = reason
    job.updated_at = now()
    return True


def move_exec(
    job: JobRecord,
    node_id: str,
    target: ExecState,
    *,
    detail: str | None = None,
    error: str | None = None,
    exit_code: int | None = None,
    result_cid: str | None = None,
) -> bool:
    execution = job.executions.get(node_id)
    if execution is None:
        if target != ExecState.BID:
            return False
        job.executions[node_id] = Execution(node_id=node_id, state=target, detail=detail or "")
        return True
    if execution.state != target and not exec_can_move(execution.state, target):
        return False
    if execution.state == target and detail is None and error is None:
        return False
    execution.state = target
    execution.updated_at = now()
    if target == ExecState.ACCEPTED:
        execution.assigned_at = execution.updated_at
    if detail is not None:
        execution.detail = detail
    if error is not None:
        execution.error = error
    if exit_code is not None:
        execution.exit_code = exit_code
    if result_cid is not None:
        execution.result_cid = result_cid
    job.updated_at = now()
    return True


def all_answered(job: JobRecord) -> bool:
    """True once ``concurrency`` chosen workers have answered and none still runs.

    A lost execution does not count: its replacement's answer will.
    """
    running = job.executions_in(*EXEC_ACTIVE)
    answered = job.executions_in(*EXEC_ANSWERED)
    return not running and len(answered) >= job.spec.concurrency


def apply_exec_update(job: JobRecord, update: ExecUpdate) -> bool:
    if job.final:
        return False
    changed = move_exec(
        job,
        update.node_id,
        update.state,
        detail=update.detail,
        error=update.error,
        exit_code=update.exit_code,
    )
    execution = job.executions.get(update.node_id)
    if changed and execution is not None and update.fuel_used is not None:
        execution.fuel_used = update.fuel_used  # a wasm job's reproducible cost
    if changed and job.state == JobState.RUNNING and all_answered(job):
        move_job(job, JobState.VERIFYING, "every chosen worker has answered; verifying")
    return changed


def apply_verdict(job: JobRecord, verdict: Verdict) -> bool:
    if job.final:
        return False
    target = {
        "accepted": JobState.ACCEPTED,
        "void": JobState.VOID,
        "failed": JobState.FAILED,
    }[verdict.outcome]
    if not move_job(job, target, verdict.reason):
        return False
    job.result_cid = verdict.result_cid
    for node_id, node in verdict.nodes.items():
        execution = job.executions.get(node_id)
        if execution is None:
            continue
        if node.verified:
            job.exit_code = node.exit_code
        if node.error is not None:
            # it failed on its own (even if its own report has not been folded in yet):
            # that says more than "rejected"; a worker that committed to a result, then did not
            # reveal what it committed to, is rejected with the verifier's reason (whether or
            # not its "completed" report came first)
            if node.committed or not move_exec(job, node_id, ExecState.FAILED, error=node.error):
                move_exec(job, node_id, ExecState.REJECTED, error=node.error)
            continue
        move_exec(
            job,
            node_id,
            ExecState.VERIFIED if node.verified else ExecState.REJECTED,
            error=node.error,
            exit_code=node.exit_code,
            result_cid=node.cid,
        )
    return True
