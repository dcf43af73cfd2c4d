"""The verification rules, as pure logic."""

from __future__ import annotations

from bacq.models import ResultMessage
from bacq.verify.logic import decide


def r(node: str, cid: str | None = None, error: str | None = None) -> ResultMessage:
    return ResultMessage(job_id="j", node_id=node, cid=cid, error=error, exit_code=0)


def test_deterministic_waits_for_every_worker() -> None:
    assert decide("j", "deterministic", 3, 2, [r("a", "X"), r("b", "X")]) is None


def test_deterministic_accepts_the_majority_and_rejects_the_rest() -> None:
    verdict = decide("j", "deterministic", 3, 2, [r("a", "X"), r("b", "Y"), r("c", "X")])
    assert verdict is not None
    assert verdict.outcome == "accepted"
    assert verdict.result_cid == "X"
    assert {n: v.verified for n, v in verdict.nodes.items()} == {"a": True, "b": False, "c": True}


def test_errors_count_as_answers_but_never_as_votes() -> None:
    verdict = decide("j", "deterministic", 3, 2, [r("a", "X"), r("b", error="boom"), r("c", "X")])
    assert verdict is not None
    assert verdict.outcome == "accepted"
    assert verdict.nodes["b"].verified is False


def test_a_tie_voids_the_job() -> None:
    verdict = decide("j", "deterministic", 2, 1, [r("a", "X"), r("b", "Y")])
    assert verdict is not None
    assert verdict.outcome == "void"
    assert verdict.reason.startswith("tie")
    assert not any(n.verified for n in verdict.nodes.values())


def test_a_lone_result_is_not_enough_when_several_workers_ran() -> None:
    verdict = decide(
        "j", "deterministic", 3, 0, [r("a", "X"), r("b", error="e"), r("c", error="e")]
    )
    assert verdict is not None
    assert verdict.outcome == "void"
    assert "no two" in verdict.reason


def test_confidence_above_the_largest_group_voids() -> None:
    verdict = decide("j", "deterministic", 3, 3, [r("a", "X"), r("b", "X"), r("c", "Y")])
    assert verdict is not None
    assert verdict.outcome == "void"
    assert "confidence 3" in verdict.reason


def test_single_worker_deterministic_accepts_its_result() -> None:
    verdict = decide("j", "deterministic", 1, 1, [r("a", "X")])
    assert verdict is not None
    assert verdict.outcome == "accepted"


def test_every_execution_failing_fails_the_job() -> None:
    verdict = decide("j", "deterministic", 2, 0, [r("a", error="e1"), r("b", error="e2")])
    assert verdict is not None
    assert verdict.outcome == "failed"
    assert "a: e1" in verdict.reason
    assert "b: e2" in verdict.reason


def test_noop_takes_the_first_result_only() -> None:
    assert decide("j", "noop", 3, 0, [r("a", error="e")]) is None
    verdict = decide("j", "noop", 3, 0, [r("a", error="e"), r("b", "X")])
    assert verdict is not None
    assert verdict.outcome == "accepted"
    assert verdict.result_cid == "X"
    assert [n for n, v in verdict.nodes.items() if v.verified] == ["b"]


def test_noop_fails_when_all_fail() -> None:
    verdict = decide("j", "noop", 2, 0, [r("a", error="e"), r("b", error="f")])
    assert verdict is not None
    assert verdict.outcome == "failed"


def test_the_requester_waits_for_a_verdict_longer_than_the_verifier_waits_for_a_reveal() -> None:
    # a worker cut off while asked to reveal: the verifier decides without it after
    # REVEAL_TIMEOUT; a requester that gave up first failed such jobs ("no verdict within 60s")
    from bacq.cli import build_parser
    from bacq.requester._base import RequesterConfig
    from bacq.verify.service import REVEAL_TIMEOUT

    margin = 60.0  # the ask comes after the last answer; a verifier failover or two
    assert RequesterConfig().verify_timeout >= REVEAL_TIMEOUT + margin
    args = build_parser().parse_args(["requester"])
    assert args.verify_timeout == RequesterConfig().verify_timeout


def test_only_a_job_of_several_workers_commits_before_it_reveals() -> None:
    from bacq.models import commit_reveal
    from bacq.spec import parse_spec

    def spec(concurrency: int, verifier: str) -> object:
        return parse_spec({"image": "busybox", "concurrency": concurrency, "verifier": verifier})

    assert not commit_reveal(spec(1, "deterministic"))  # nothing to copy: the result at once
    assert not commit_reveal(spec(1, "noop"))
    assert commit_reveal(spec(2, "deterministic"))
    assert commit_reveal(spec(3, "noop"))
