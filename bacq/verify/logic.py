"""The verification rules: given the results of a job's workers, accept one, void the job, or wait.

Pure logic, touches nothing; the verifier service feeds it and publishes what it decides.

- ``noop``: accept the first result that has a CID; fail when every chosen worker failed.
- ``deterministic``: wait for all ``concurrency`` answers (errors count), group the CIDs, and
  accept the largest group when it is the only largest, has at least ``confidence`` members and,
  with more than one worker, more than one member. Anything else voids the job. Workers outside
  the winning group are rejected: identical output gives an identical CID, so they differed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from bacq.models import NodeVerdict, ResultMessage, Verdict

__all__ = ["decide"]


@dataclass(frozen=True)
class _Decision:
    outcome: Literal["accepted", "void", "failed"]
    reason: str
    cid: str | None = None


def _errors(results: list[ResultMessage]) -> str:
    return "; ".join(f"{r.node_id}: {r.error}" for r in results if r.error)


def _noop(concurrency: int, results: list[ResultMessage]) -> _Decision | None:
    for result in results:
        if result.cid:
            return _Decision(
                "accepted", f"noop verifier took {result.node_id}'s result", result.cid
            )
    if len(results) >= concurrency:
        return _Decision("failed", "every execution failed: " + _errors(results))
    return None


def _deterministic(
    concurrency: int, confidence: int, results: list[ResultMessage]
) -> _Decision | None:
    if len(results) < concurrency:
        return None
    groups = Counter(r.cid for r in results if r.cid)
    if not groups:
        return _Decision("failed", "every execution failed: " + _errors(results))
    ranked = groups.most_common()
    cid, size = ranked[0]
    n = len(results)
    if len(ranked) > 1 and ranked[1][1] == size:
        tied = sum(1 for _, s in ranked if s == size)
        return _Decision("void", f"tie: {tied} different results with {size} of {n} votes each")
    if size < confidence:
        return _Decision(
            "void", f"only {size} of {n} results agree; confidence {confidence} is required"
        )
    if size == 1 and concurrency > 1:
        return _Decision("void", f"no two of the {n} results agree")
    return _Decision("accepted", f"{size} of {n} results agree", cid)


def decide(
    job_id: str,
    verifier: str,
    concurrency: int,
    confidence: int,
    results: list[ResultMessage],
) -> Verdict | None:
    """The verdict for ``results`` (in arrival order), or None while more are awaited."""
    if verifier == "noop":
        decision = _noop(concurrency, results)
    else:
        decision = _deterministic(concurrency, confidence, results)
    if decision is None:
        return None
    nodes = {
        r.node_id: NodeVerdict(
            cid=r.cid,
            error=r.error,
            exit_code=r.exit_code,
            verified=decision.cid is not None and r.cid == decision.cid,
        )
        for r in results
    }
    if verifier == "noop" and decision.cid is not None:
        # noop trusts exactly one result: the first, even if later ones match it
        first = next(r.node_id for r in results if r.cid == decision.cid)
        for node_id, node in nodes.items():
            node.verified = node_id == first
    return Verdict(
        job_id=job_id,
        outcome=decision.outcome,
        reason=decision.reason,
        result_cid=decision.cid,
        nodes=nodes,
    )
