"""The chaos run (``bacq lab chaos``): many jobs through a running lab while hosts are cut off and
services killed, then a check of every job.

Touches the running lab (through ``bacq.lab.core.Lab``: cuts, heals, ``kill -9`` and restarts of
its services) and its NATS as the lab's client (submissions, job records, histories). One fault
at a time, each held a few seconds and undone; at most one NATS server is away at once, so the
cluster keeps its majority. At the end every job must be final (none lost), none may have been
decided twice (one final event, at most one ``accepted``), its history must verify against the
requester keys as ``bacq history --verify`` checks it (``bacq.events.verify_history``), and the
lab must hold exactly the jobs submitted (no second job for a retried submission). Prints the
figures; exits 1 on any anomaly.

Its options live in ``bacq.lab._options`` (the ``bacq`` parser mounts them without importing this).
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bacq.lab._options import FAULT_KINDS, add_chaos_arguments

if TYPE_CHECKING:
    from bacq.client import Client
    from bacq.lab.core import Lab

FINAL_STATES = ("accepted", "void", "failed", "cancelled")

__all__ = ["FAULT_KINDS", "ChaosFigures", "add_chaos_arguments", "chaos", "run_chaos"]


@dataclass
class ChaosFigures:
    """What a chaos run did and found."""

    jobs: int
    seconds: float = 0.0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    states: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: list[str] = field(default_factory=list)  # never final, or never submitted
    duplicated: list[str] = field(default_factory=list)  # decided twice, or a second job
    unverified: list[str] = field(default_factory=list)  # history --verify fails
    executions_lost: int = 0  # executions moved to another worker (retries)
    failed_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    log: list[str] = field(default_factory=list)
    fault_errors: list[str] = field(default_factory=list)  # a fault that could not be injected

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unverified)

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "seconds": round(self.seconds, 1),
            "faults": dict(self.faults),
            "faults_total": sum(self.faults.values()),
            "states": dict(self.states),
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "unverified": len(self.unverified),
            "executions_lost": self.executions_lost,
            "failed_reasons": dict(self.failed_reasons.most_common(5)),
            "anomalies": (self.lost + self.duplicated + self.unverified)[:20],
            "fault_errors": self.fault_errors[:20],
            "ok": self.ok,
        }

    def table(self) -> str:
        rows = [
            ("jobs", str(self.jobs)),
            ("wall time", f"{self.seconds:.0f} s"),
            (
                "faults injected",
                f"{sum(self.faults.values())} ("
                + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
                + ")",
            ),
            ("final states", ", ".join(f"{k} {v}" for k, v in sorted(self.states.items()))),
            ("executions moved to another worker", str(self.executions_lost)),
            ("lost (never final)", str(len(self.lost))),
            ("duplicated (decided twice, or a second job)", str(len(self.duplicated))),
            ("history --verify fails", str(len(self.unverified))),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        for reason, n in self.failed_reasons.most_common(5):
            lines.append(f"  failed ({n}): {reason}")
        for anomaly in (self.lost + self.duplicated + self.unverified)[:20]:
            lines.append(f"  anomaly: {anomaly}")
        for error in self.fault_errors[:10]:
            lines.append(f"  fault not injected: {error}")
        return "\n".join(lines)


async def _active_host(lab: Lab, client: Client, role: str) -> str | None:
    """The host of the instance holding ``role``'s lease (None in between holders)."""
    import asyncio

    from bacq.lease import read_leases

    holder = (await read_leases(client.bus)).get(role)
    if holder is None:
        return None
    for host in lab.hosts():
        if host.role == role and await asyncio.to_thread(lab.pid, host.name) == holder.pid:
            return host.name
    return None


async def _faults(
    lab: Lab,
    client: Client,
    kinds: list[str],
    rng: random.Random,
    args: argparse.Namespace,
    figures: ChaosFigures,
    stop: Any,
) -> None:
    """Inject one fault at a time until ``stop`` is set; each is undone before the next."""
    import asyncio

    import nats.errors

    from bacq.errors import BacqError

    workers = [h.name for h in lab.hosts() if h.role == "worker"]
    servers = [h.name for h in lab.hosts() if h.role == "nats"]
    while not stop.is_set():
        pause = rng.uniform(args.fault_every / 2, args.fault_every * 1.5)
        try:
            await asyncio.wait_for(stop.wait(), timeout=pause)
            return
        except TimeoutError:
            pass
        kind = rng.choice(kinds)
        action, role = kind.split("-", 1)
        if role == "worker":
            host: str | None = rng.choice(workers)
        elif role == "nats":
            host = rng.choice(servers)
        else:
            try:
                async with asyncio.timeout(20):
                    host = await _active_host(lab, client, role)
            except (nats.errors.Error, TimeoutError):  # JetStream electing a leader: next time
                host = None
        if host is None:
            continue  # a takeover is under way: leave it be
        hold = rng.uniform(args.hold / 3, args.hold)
        figures.log.append(f"{time.strftime('%X')} {action} {host} for {hold:.0f}s")
        figures.faults[kind] += 1
        try:
            if action == "cut":
                await asyncio.to_thread(lab.cut, host)
                await asyncio.sleep(hold)
                await asyncio.to_thread(lab.heal, host)
            else:
                await asyncio.to_thread(lab.kill, host)
                await asyncio.sleep(hold)
                await asyncio.to_thread(lab.start, host)
        except BacqError as exc:  # the harness's own trouble: said, not counted as the lab's
            figures.fault_errors.append(f"{kind} {host}: {exc}")


async def chaos(lab: Lab, args: argparse.Namespace) -> ChaosFigures:
    """Run the chaos run against the running ``lab``; the figures."""
    import asyncio
    import contextlib

    import nats.errors

    from bacq import subjects
    from bacq.auth import NatsOptions
    from bacq.bus import again
    from bacq.client import Client
    from bacq.errors import ConfigError, RequestRejected
    from bacq.events import Event, verify_history
    from bacq.signing import fetch_requester_keys
    from bacq.states import JobState

    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise ConfigError(
            f"--faults: unknown kind {unknown[0]!r}; the kinds: {', '.join(FAULT_KINDS)}"
        )
    if args.jobs < 1 or args.parallel < 1 or args.rate < 0:
        raise ConfigError("--jobs and --parallel must be at least 1, --rate at least 0")
    report = await asyncio.to_thread(lab.status)
    if not report["up"]:
        raise ConfigError(f"no lab in {lab.state_dir}; start one with `bacq lab up`")
    env = report["env"]
    rng = random.Random(args.seed)  # noqa: S311 - chaos, not cryptography
    run_id = f"{args.seed}-{int(time.time())}"
    figures = ChaosFigures(jobs=args.jobs)
    started = time.monotonic()
    async with await Client.connect(
        env["BACQ_NATS_URL"], options=NatsOptions.from_env("client", env)
    ) as client:
        stop = asyncio.Event()
        faults = asyncio.create_task(_faults(lab, client, kinds, rng, args, figures, stop))
        gate = asyncio.Semaphore(args.parallel)
        ids: list[str] = [""] * args.jobs
        done = [0]  # jobs final so far
        spec: dict[str, Any] = {
            "image": "bacq-test/busybox",
            "command": ["echo", "chaos"],
            "timeout": 60,
            "bid_timeout": 30,
            "retries": 10,
            "labels": {"bacq.chaos": run_id},
        }

        async def one(i: int) -> str:
            if args.rate:  # spread over time, so that the faults meet the jobs
                await asyncio.sleep(i / args.rate)
            async with gate:
                # the client's own trouble with NATS (a server cut off under it) is retried: the
                # same idempotency key gives the same job, and waiting again loses nothing
                while not ids[i]:
                    with contextlib.suppress(nats.errors.Error, RequestRejected):
                        ids[i] = await client.submit(
                            {**spec, "command": ["echo", f"chaos {run_id} {i}"]},
                            idempotency_key=f"chaos-{run_id}-{i}",
                            timeout=30,
                            attempts=20,
                        )
                state = ""
                while not state:
                    with contextlib.suppress(nats.errors.Error):
                        state = (await client.wait(ids[i], timeout=args.timeout)).state.value
                    if not state:
                        await asyncio.sleep(1)
            done[0] += 1
            if done[0] % max(1, args.jobs // 10) == 0:
                print(
                    f"chaos: {done[0]}/{args.jobs} jobs final after "
                    f"{time.monotonic() - started:.0f}s, {sum(figures.faults.values())} faults",
                    file=sys.stderr,
                    flush=True,
                )
            return state

        try:
            async with asyncio.timeout(args.timeout):
                states = await asyncio.gather(
                    *(one(i) for i in range(args.jobs)), return_exceptions=True
                )
        finally:
            stop.set()
            await faults  # the last fault is undone before the check
        figures.seconds = time.monotonic() - started

        trusted = (await fetch_requester_keys(client.bus.js)) or None
        keys = trusted.keys if trusted is not None else []
        for job_id, state in zip(ids, states, strict=True):
            if not job_id or isinstance(state, BaseException):
                figures.lost.append(f"{job_id or '(not submitted)'}: never final ({state!r})")
                figures.states["unfinished"] += 1
                continue
            figures.states[str(state)] += 1
            record = await again(lambda j=job_id: client.job(j))  # type: ignore[misc]

            async def read(job_id: str = job_id) -> list[Event]:
                # each read makes a consumer that lingers a minute; the server refuses more than
                # it allows (err_code 10026) while thousands of histories are read, and JetStream
                # may be electing a leader: wait a little and read again
                for _ in range(90):
                    try:
                        stream = client.bus.replay_events(subjects.events(job_id))
                        return [e async for _, e in stream]
                    except (nats.errors.Error, TimeoutError):
                        await asyncio.sleep(2)
                return [e async for _, e in client.bus.replay_events(subjects.events(job_id))]

            events = await read()
            decided = [e for e in events if e.kind == "job" and e.state in FINAL_STATES]
            accepted = [e for e in decided if e.state == "accepted"]
            if len(decided) > 1 or len(accepted) > 1:
                verdicts = ", ".join(str(e.state) for e in decided)
                figures.duplicated.append(f"{job_id}: decided {len(decided)} times ({verdicts})")
            check = verify_history(events, record, keys, require_signatures=True)
            if not check.ok:
                figures.unverified.append(f"{job_id}: {'; '.join(check.problems)[:300]}")
            figures.executions_lost += sum(
                1 for e in record.executions.values() if e.state.value == "lost"
            )
            if record.state == JobState.FAILED:
                figures.failed_reasons[record.reason.split(";")[0][:100]] += 1
        # exactly the jobs submitted: a retried submission made no second job
        every = await again(client.jobs)
        ours = [r.id for r in every if r.spec.labels.get("bacq.chaos") == run_id]
        extra = sorted(set(ours) - set(ids))
        figures.duplicated += [f"{j}: a job nobody submitted (a second one?)" for j in extra]
    return figures


def run_chaos(lab: Lab, args: argparse.Namespace) -> int:
    """``bacq lab chaos``: print the figures; 0 when there is no anomaly."""
    import asyncio
    import json

    print(
        f"chaos run: {args.jobs} jobs, {args.parallel} in flight, faults "
        f"({args.faults}) every ~{args.fault_every:g}s, seed {args.seed} …",
        file=sys.stderr,
    )
    figures = asyncio.run(chaos(lab, args))
    if args.output == "json":
        print(json.dumps(figures.as_dict(), indent=2))
    else:
        print(figures.table())
    return 0 if figures.ok else 1
