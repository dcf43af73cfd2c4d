"""Known answers: a deterministic job whose work was verified before is answered at once.

A job is deterministic when it runs on the wasm engine with its clocks and randomness under
bacq's control (the default there), or when its submitter marks a Docker job ``deterministic``.
Its output is then a function of what it runs and on what: the ``answer_key`` hashes every spec
field that can change the output (image or module, command, environment, inputs by CID, outputs,
resources, network...) and none of those that only say how to run it (concurrency, confidence,
timeouts, retries, labels, node selector, verifier). When a job with that key was accepted, a new
one is recorded as accepted with the same result, its history saying so (``answered`` by the
requester, naming the job it took the answer from); ``no_cache`` in the spec (``--no-cache``)
runs it again.

Touches NATS only through the caller: the bucket ``bacq-answers`` (key = answer key, value = the
accepted job's id), written by the requester alone.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from bacq.spec import JobSpec

__all__ = ["answer_key", "is_deterministic"]

# fields that say how to run a job, not what it computes
_HOW = frozenset(
    {
        "concurrency",
        "confidence",
        "min_bids",
        "retries",
        "bid_timeout",
        "queue_timeout",
        "timeout",
        "labels",
        "node_selector",
        "verifier",
        "no_cache",
        "live_logs",
        "name",
        "description",
    }
)


def is_deterministic(spec: JobSpec) -> bool:
    """True for a job whose output depends on its spec and inputs alone."""
    if getattr(spec, "deterministic", None) is not None:
        return bool(getattr(spec, "deterministic", False))
    return getattr(spec, "engine", "docker") == "wasm"


def answer_key(spec: JobSpec) -> str | None:
    """The key of ``spec``'s known answer, or None when it may not have one (not
    deterministic, or ``no_cache``)."""
    if getattr(spec, "no_cache", False) or not is_deterministic(spec):
        return None
    what: dict[str, Any] = {k: v for k, v in spec.model_dump(mode="json").items() if k not in _HOW}
    text = json.dumps(what, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(b"bacq-answer-v1|" + text.encode()).hexdigest()[:48]
