"""Soak test: many jobs through a devstack while workers are killed and nats-server restarts.

Not part of the default test run (it takes minutes). Run it from the venv:

    python scripts/soak.py --jobs 1000 --workers 3

It submits the jobs, kills a random worker with SIGKILL every few seconds (and starts it again),
restarts nats-server now and then, and at the end checks that every job reached a final state,
that no job was accepted twice, and that every job's history is complete (contiguous sequence
numbers) and verifies (hash chain). It prints a summary and exits non-zero on any anomaly.

With ``--hostile lazy`` (the default) or ``--hostile tamper``, one more worker attacks: it copies
instead of computing, or tampers with its output. Jobs then run on 3 workers with deterministic
verification, and a job whose accepted result is the hostile worker's is an anomaly.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time

from bacq.client import Client
from bacq.devstack import Devstack
from bacq.events import verify_chain
from bacq.states import JobState


async def chaos(
    stack: Devstack, stop: asyncio.Event, args: argparse.Namespace, log: list[str]
) -> None:
    rng = random.Random(args.seed)  # noqa: S311 - chaos, not cryptography
    last_nats = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(args.kill_every / 2, args.kill_every * 1.5))
        if stop.is_set():
            return
        if time.monotonic() - last_nats > args.nats_every:
            log.append(f"{time.strftime('%X')} restart nats-server")
            await asyncio.to_thread(stack.restart_nats)
            last_nats = time.monotonic()
            continue
        victim = stack.worker_name(rng.randrange(stack.n_workers))
        log.append(f"{time.strftime('%X')} kill -9 {victim}")
        stack.kill(victim)
        await asyncio.sleep(2)
        await asyncio.to_thread(stack.restart, victim)


async def soak(args: argparse.Namespace) -> int:
    hostile = args.hostile != "none"
    workers = args.workers + (1 if hostile else 0)
    if args.hostile == "tamper":  # the devstack's bad worker is w1
        bad = "w1"
        stack = Devstack(workers=workers, bad_workers=1)
    else:  # the lazy one is the last
        bad = f"w{workers}"
        lazy = {bad: {"BACQ_WORKER_LAZY": "1"}} if hostile else {}
        stack = Devstack(workers=workers, role_env=lazy)
    await asyncio.to_thread(stack.start)
    started = time.monotonic()
    events: list[str] = []
    try:
        async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
            stop = asyncio.Event()
            chaos_task = asyncio.create_task(chaos(stack, stop, args, events))
            # at most --parallel jobs in flight, so that the kills hit running jobs rather than
            # jobs waiting in the requester's queue
            gate = asyncio.Semaphore(args.parallel)
            ids: list[str] = [""] * args.jobs

            async def one(i: int) -> JobState:
                async with gate:
                    ids[i] = await client.submit(
                        {
                            "image": "bacq-test/busybox",
                            "command": ["echo", f"job {i}"],
                            "bid_timeout": 30,
                            **(
                                {"concurrency": 3, "confidence": 2, "verifier": "deterministic"}
                                if hostile
                                else {}
                            ),
                        },
                        idempotency_key=f"soak-{args.seed}-{i}",
                        timeout=30,
                        attempts=10,
                    )
                    return (await client.wait(ids[i], timeout=args.timeout)).state

            states = await asyncio.gather(
                *(one(i) for i in range(args.jobs)), return_exceptions=True
            )
            stop.set()
            chaos_task.cancel()
            anomalies = []
            for job_id, state in zip(ids, states, strict=True):
                if isinstance(state, BaseException) or not job_id:
                    anomalies.append(f"{job_id}: never reached a final state ({state!r})")
                    continue
                if hostile and state == JobState.ACCEPTED:
                    job = await client.job(job_id)
                    if job.executions.get(bad) and job.executions[bad].state.value == "verified":
                        anomalies.append(f"{job_id}: the hostile worker {bad}'s result won")
                history = await client.history(job_id)
                accepted = sum(1 for e in history if e.kind == "job" and e.state == "accepted")
                if accepted > 1:
                    anomalies.append(f"{job_id}: accepted {accepted} times")
                if [e.seq for e in history] != list(range(1, len(history) + 1)):
                    anomalies.append(f"{job_id}: history has gaps")
                flaw = verify_chain(history)
                if flaw:
                    anomalies.append(f"{job_id}: {flaw}")
            counts = collections.Counter(
                s.value if isinstance(s, JobState) else "unfinished" for s in states
            )
            failed = [j for j, s in zip(ids, states, strict=True) if s == JobState.FAILED]
            reasons: collections.Counter[str] = collections.Counter()
            for job_id in failed:
                reasons[(await client.job(job_id)).reason.split(":")[0][:80]] += 1
    finally:
        await asyncio.to_thread(stack.stop)
    elapsed = time.monotonic() - started
    print(
        f"soak: {args.jobs} jobs, {args.workers} workers + hostile: {args.hostile}, "
        f"{elapsed:.0f}s, chaos: {len(events)} "
        f"({sum('kill' in e for e in events)} worker kills, "
        f"{sum('nats' in e for e in events)} nats-server restarts)"
    )
    print("final states: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for reason, n in reasons.most_common(5):
        print(f"  failed ({n}): {reason}")
    print(f"anomalies: {len(anomalies)}")
    for anomaly in anomalies[:20]:
        print("  " + anomaly)
    return 1 if anomalies else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=8, help="jobs in flight at once")
    parser.add_argument("--kill-every", type=float, default=8.0, help="seconds between kills")
    parser.add_argument(
        "--nats-every", type=float, default=45.0, help="seconds between nats-server restarts"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per job at most")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--hostile",
        choices=["lazy", "tamper", "none"],
        default="lazy",
        help="one more worker that copies instead of computing (lazy) or tampers with its output",
    )
    return asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
