"""The requester's slot counting and choice of workers to invite: pure logic, no components."""

from __future__ import annotations

import time
from typing import Any, cast

from bacq.bus import Bus
from bacq.models import Execution, JobRecord, NodeInfo
from bacq.requester.service import Requester
from bacq.spec import parse_spec
from bacq.states import ExecState


def requester(*nodes: NodeInfo) -> Requester:
    r = Requester(cast(Bus, None))
    for node in nodes:
        r._nodes[node.node_id] = (node, time.monotonic())
    return r


def node(name: str, *, max_jobs: int = 2, cpu: float = 2.0, **fields: Any) -> NodeInfo:
    return NodeInfo(
        node_id=name, cpu=cpu, memory=4 * 1024**3, max_jobs=max_jobs, running=0, **fields
    )


def running(r: Requester, job_id: str, node_id: str, **spec: Any) -> None:
    job = JobRecord(id=job_id, spec=parse_spec({"image": "x", **spec}))
    job.executions[node_id] = Execution(node_id=node_id, state=ExecState.RUNNING)
    r._keep(job)


SPEC = parse_spec({"image": "x"})


def test_the_freest_workers_are_invited() -> None:
    r = requester(node("a"), node("b"), node("c"))
    running(r, "j1", "a")
    running(r, "j2", "b")
    running(r, "j3", "b")
    assert r._pick(r._fitting(SPEC), SPEC, 1) == ["c"]
    assert sorted(r._pick(r._fitting(SPEC), SPEC, 2) or []) == ["a", "c"]


def test_no_invitation_when_too_few_workers_have_a_free_slot() -> None:
    r = requester(node("a", max_jobs=1), node("b", max_jobs=1))
    running(r, "j1", "a")
    assert r._pick(r._fitting(SPEC), SPEC, 2) is None
    assert r._pick(r._fitting(SPEC), SPEC, 1) == ["b"]


def test_invitations_hold_slots_until_released() -> None:
    r = requester(node("a", max_jobs=1))
    running(r, "j0", "b-unrelated")
    waiting = JobRecord(id="j1", spec=SPEC)
    r._keep(waiting)
    r._hold(waiting, ["a"])
    assert r._pick(r._fitting(SPEC), SPEC, 1) is None
    r._release("j1")
    assert r._pick(r._fitting(SPEC), SPEC, 1) == ["a"]


def test_a_worker_without_the_cpu_left_is_not_invited() -> None:
    r = requester(node("a", max_jobs=4, cpu=2.0))
    running(r, "j1", "a", resources={"cpu": 1.5})
    big = parse_spec({"image": "x", "resources": {"cpu": 1}})
    assert r._pick(r._fitting(big), big, 1) is None
    small = parse_spec({"image": "x", "resources": {"cpu": 0.5}})
    assert r._pick(r._fitting(small), small, 1) == ["a"]


def test_workers_that_could_never_run_the_job_do_not_fit() -> None:
    r = requester(node("a", labels={"gpu": "no"}), node("b", cpu=1.0), node("c", draining=True))
    gpu = parse_spec({"image": "x", "node_selector": {"gpu": "yes"}})
    assert r._fitting(gpu) == []
    wide = parse_spec({"image": "x", "resources": {"cpu": 2}})
    assert [n.node_id for n in r._fitting(wide)] == ["a"]
    networked = parse_spec({"image": "x", "network": True})
    assert r._fitting(networked) == []


def test_a_finished_job_frees_its_workers_slot() -> None:
    r = requester(node("a", max_jobs=1))
    running(r, "j1", "a")
    assert r._pick(r._fitting(SPEC), SPEC, 1) is None
    job = r._records["j1"].model_copy(deep=True)
    job.executions["a"].state = ExecState.COMPLETED
    r._keep(job)
    assert r._pick(r._fitting(SPEC), SPEC, 1) == ["a"]


def test_the_watchdog_looks_only_at_running_jobs_and_queue_ends_in_order() -> None:
    """What _check_all reads: the running/verifying jobs (a set) and the queued jobs' queue
    ends (a heap, earliest first), not every record."""
    import heapq

    from bacq.states import JobState

    r = requester(node("a"))
    late = JobRecord(id="late", spec=parse_spec({"image": "x", "queue_timeout": 600}))
    soon = JobRecord(id="soon", spec=parse_spec({"image": "x", "queue_timeout": 5}))
    r._keep(late)
    r._keep(soon)
    busy = JobRecord(id="busy", spec=SPEC, state=JobState.RUNNING)
    r._keep(busy)
    assert r._watched == {"busy"}
    assert [heapq.heappop(r._queue_ends)[1] for _ in range(2)] == ["soon", "late"]
    r._keep(busy.model_copy(update={"state": JobState.ACCEPTED}))
    assert r._watched == set()


def test_the_queue_ends_heap_is_rebuilt_when_left_entries_pile_up() -> None:
    """A job back in the queue (a retry) adds an entry; entries of jobs that moved on are
    dropped once the heap outgrows twice the records."""
    from bacq.states import JobState

    r = requester(node("a"))
    job = JobRecord(id="j", spec=SPEC)
    for _ in range(3000):
        r._keep(job)
        r._keep(job.model_copy(update={"state": JobState.BIDDING}))
    assert len(r._queue_ends) <= 2 * len(r._records) + 1024 + 1
    r._keep(job)
    assert "j" in {entry[1] for entry in r._queue_ends}
