"""The state table and the record changes built on it."""

from __future__ import annotations

from bacq.models import ExecUpdate, JobRecord, NodeVerdict, Verdict
from bacq.requester.record import apply_exec_update, apply_verdict, move_exec, move_job
from bacq.spec import JobSpec
from bacq.states import EXEC_TRANSITIONS, JOB_FINAL, JOB_TRANSITIONS, ExecState, JobState


def update(node: str, state: ExecState, **fields: object) -> ExecUpdate:
    return ExecUpdate(job_id="j-1", node_id=node, state=state, **fields)  # type: ignore[arg-type]


def running_job(*nodes: str) -> JobRecord:
    job = JobRecord(id="j-1", spec=JobSpec(image="x", concurrency=len(nodes)))
    move_job(job, JobState.BIDDING)
    for node in nodes:
        move_exec(job, node, ExecState.BID)
        move_exec(job, node, ExecState.ACCEPTED)
    move_job(job, JobState.RUNNING)
    return job


def test_every_state_has_a_row_and_final_states_lead_nowhere() -> None:
    assert set(JOB_TRANSITIONS) == set(JobState)
    assert set(EXEC_TRANSITIONS) == set(ExecState)
    for state in JOB_FINAL:
        assert JOB_TRANSITIONS[state] == frozenset()


def test_late_progress_never_moves_an_execution_backwards() -> None:
    job = running_job("w1")
    assert apply_exec_update(job, update("w1", ExecState.COMPLETED))
    assert not apply_exec_update(job, update("w1", ExecState.RUNNING))
    assert job.executions["w1"].state == ExecState.COMPLETED


def test_job_verifies_once_every_chosen_worker_answered() -> None:
    job = running_job("w1", "w2")
    apply_exec_update(job, update("w1", ExecState.COMPLETED))
    assert job.state == JobState.RUNNING
    apply_exec_update(job, update("w2", ExecState.FAILED, error="e"))
    assert job.state == JobState.VERIFYING


def test_verdict_marks_nodes_and_ends_the_job_once() -> None:
    job = running_job("w1", "w2", "w3")
    verdict = Verdict(
        job_id="j-1",
        outcome="accepted",
        reason="2 of 3",
        result_cid="X",
        nodes={
            "w1": NodeVerdict(cid="X", verified=True, exit_code=0),
            "w2": NodeVerdict(cid="Y"),
            "w3": NodeVerdict(cid="X", verified=True, exit_code=0),
        },
    )
    assert apply_verdict(job, verdict)
    assert job.state == JobState.ACCEPTED
    assert job.result_cid == "X"
    assert job.exit_code == 0
    assert job.executions["w2"].state == ExecState.REJECTED
    assert not apply_verdict(job, verdict)
    assert not apply_exec_update(job, update("w1", ExecState.COMPLETED))


def test_an_update_for_a_worker_that_never_bid_is_ignored() -> None:
    job = running_job("w1")
    assert not apply_exec_update(job, update("w9", ExecState.RUNNING))
    assert "w9" not in job.executions
