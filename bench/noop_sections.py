"""Sections 3 and 4: orchestration-only throughput with ``bacq worker --executor noop``.

Touches devstacks of its own (nats-server, one kubo node, requester, verifier, noop workers), each
started and stopped here, and ``/proc`` for the services' memory and CPU time. No Docker.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from pathlib import Path
from typing import Any

from bacq.devstack import Devstack
from bench.common import IMAGE, memory_report, monitor_nats, run_batch, say

# each noop devstack's nats-server monitoring port (/varz: messages per job)
NATS_PORTS: weakref.WeakKeyDictionary[Devstack, int] = weakref.WeakKeyDictionary()


def noop_spec(concurrency: int, bid_timeout: float | None) -> dict[str, Any]:
    """A job for noop workers (the image is never run); concurrency 3 is verified by quorum."""
    spec: dict[str, Any] = {
        "image": IMAGE,
        "command": ["true"],
        "concurrency": concurrency,
        "verifier": "deterministic" if concurrency > 1 else "noop",
    }
    if bid_timeout is not None:
        spec["bid_timeout"] = bid_timeout
    return spec


def noop_stack(workers: int, max_jobs: int, state_root: Path | None) -> Devstack:
    state_dir = None
    if state_root is not None:
        state_dir = state_root / f"noop-{workers}w-{time.strftime('%H%M%S')}"
    started = time.monotonic()
    stack = Devstack(
        workers=workers,
        kubo_nodes=1,
        max_jobs=max_jobs,
        # a noop job uses nothing, but a worker still counts each one's cpu and memory (1 core,
        # 512 MiB by default) against what it offers (os.cpu_count() cores, 4 GiB): offer enough
        # that --max-jobs is the limit, as it would be with small jobs on a big machine
        worker_args=[
            "--executor",
            "noop",
            "--cpu",
            str(max_jobs),
            "--memory",
            f"{max_jobs * 512}m",
        ],
        state_dir=state_dir,
    )
    NATS_PORTS[stack] = monitor_nats(stack)
    stack.start()
    say(f"  devstack with {workers} noop workers up in {time.monotonic() - started:.1f}s")
    return stack


def _batch(stack: Devstack, jobs: int, concurrency: int, args: Any, label: str) -> dict[str, Any]:
    say(f"{label}: {jobs} jobs at once, concurrency {concurrency}, {stack.n_workers} workers")
    batch = asyncio.run(
        run_batch(
            stack,
            noop_spec(concurrency, args.bid_timeout),
            jobs,
            parallel=args.submit_parallel,
            stall=args.stall,
            # from --bulk-from jobs on (10,000), in bulk as `bacq create -f` submits: "queued
            # at once", where one request per job would take minutes at 100,000 jobs
            bulk=jobs >= args.bulk_from,
            nats_port=NATS_PORTS.get(stack),
        )
    )
    result = batch.as_dict()
    result.update(
        workers=stack.n_workers,
        max_jobs=stack.max_jobs,
        concurrency=concurrency,
        memory=memory_report(stack),
    )
    lat = result["latency"]
    say(
        f"  {result['jobs_per_s'] or 0:.1f} jobs/s (submissions {result['submits_per_s'] or 0:.0f}"
        f"/s); latency p50 {lat['p50'] or 0:.3f}s p95 {lat['p95'] or 0:.3f}s; accepted "
        f"{result['accepted']}, failed {result['failed']}, lost {result['lost']}, "
        f"submit errors {result['submit_errors']}"
    )
    if result["failure_reasons"]:
        say(f"  failures: {result['failure_reasons']}")
    if result["lost_states"]:
        say(f"  lost (not final), by state: {result['lost_states']}")
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(result["cpu_ms_per_job"].items()))
    say(f"  CPU ms per job: {cpu}")
    nats = result["nats_per_job"]
    if nats:
        say(
            f"  NATS per job: {nats.get('in_msgs', 0):.1f} messages in, "
            f"{nats.get('out_msgs', 0):.1f} out, {nats.get('js_api_calls', 0):.1f} JetStream "
            "API calls"
        )
    if result["accepted_twice"]:
        say(
            f"  [red]accepted twice[/]: {result['duplicate_ids']} ids given twice, "
            f"{result['changed_after_final']} changed after final, {result['over_verified']} "
            "with more verified executions than their concurrency"
        )
    return result


def orchestration(args: Any) -> dict[str, Any]:
    """M jobs at once through 3 noop workers, concurrency 1 (noop verifier) and 3 (quorum)."""
    results = {}
    for c in (1, 3):  # a fresh devstack each: nothing left over, memory peaks of its own
        stack = noop_stack(3, args.max_jobs, args.state_root)
        try:
            results[f"c{c}"] = _batch(stack, args.noop_jobs, c, args, "orchestration")
        finally:
            stack.stop()
    return results


def scale_grid(args: Any) -> list[tuple[int, int]]:
    """Every worker count at the first job count; the other job counts at one worker count."""
    first, *more = args.scale_jobs
    grid = [(w, first) for w in args.scale_workers]
    grid += [(args.scale_big_workers, n) for n in more]
    return grid


def scale(args: Any) -> dict[str, Any]:
    """The grid of scale_grid at concurrency 1; the larger job counts (``big``) must all be
    accepted, none lost or accepted twice, and the requester's peak memory compared across them.
    """
    runs: list[dict[str, Any]] = []
    first = args.scale_jobs[0]
    for workers, jobs in scale_grid(args):
        say(f"scale: {workers} workers, {jobs} jobs")
        big = jobs != first  # the job counts compared at --scale-big-workers
        try:
            stack = noop_stack(workers, args.max_jobs, args.state_root)
        except Exception as exc:
            runs.append(
                {"workers": workers, "jobs": jobs, "big": big, "error": f"devstack: {exc}"[:2000]}
            )
            say(f"  [red]devstack failed[/]: {exc}")
            continue
        try:
            runs.append({**_batch(stack, jobs, 1, args, "scale"), "big": big})
        except Exception as exc:
            runs.append({"workers": workers, "jobs": jobs, "big": big, "error": repr(exc)[:2000]})
            say(f"  [red]failed[/]: {exc!r}")
        finally:
            stack.stop()
    return {"grid": scale_grid(args), "concurrency": 1, "runs": runs}
