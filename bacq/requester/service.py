"""The requester: takes submissions, runs the bidding, assigns workers, records every state change.

Touches NATS only: it is the single writer of the ``bacq-jobs`` bucket. It answers submissions on
``bacq.api.submit``, announces jobs, collects bids, assigns ``concurrency`` workers (rejecting the
others so they free their capacity), folds worker progress and the verifier's verdict into the job
record, and fails a job with a reason when a deadline passes (no bids; no result in time).
On start it picks up every unfinished job from the bucket and drives it on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from datetime import timedelta
from functools import partial
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from bacq import subjects
from bacq.bus import Bus
from bacq.errors import SpecError
from bacq.log import get_logger
from bacq.models import (
    Announcement,
    Assignment,
    AssignmentReply,
    Bid,
    ExecUpdate,
    JobRecord,
    Problem,
    ResultMessage,
    SubmitReply,
    SubmitRequest,
    Verdict,
    decode,
    encode,
    new_job_id,
    now,
)
from bacq.requester.record import apply_exec_update, apply_verdict, move_exec, move_job
from bacq.spec import JobSpec, parse_spec
from bacq.states import EXEC_ACTIVE, ExecState, JobState

__all__ = ["Requester"]

ASSIGN_TIMEOUT = 5.0  # seconds a chosen worker has to confirm an assignment
REANNOUNCE_EVERY = 2.0  # seconds between announcements while bids are missing


def _apply_update(job: JobRecord, *, update: ExecUpdate) -> bool:
    return apply_exec_update(job, update)


def _apply_verdict(job: JobRecord, *, verdict: Verdict) -> bool:
    return apply_verdict(job, verdict)


class Requester:
    def __init__(self, bus: Bus, *, result_grace: float = 120.0) -> None:
        self.bus = bus
        self.result_grace = result_grace  # beyond the job's timeout: inputs, image, publishing
        self.log = get_logger("bacq.requester")
        self._locks: dict[str, asyncio.Lock] = {}
        self._bids: dict[str, list[Bid]] = {}
        self._bid_arrived: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- helpers ----------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def mutate(self, job_id: str, change: Callable[[JobRecord], bool]) -> JobRecord | None:
        """Load, change and save one job record under its lock; returns the record."""
        lock = self._locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            job = await self.bus.load_job(job_id)
            if job is None:
                return None
            if change(job):
                job.updated_at = now()
                await self.bus.save_job(job)
            if job.final:
                self._locks.pop(job_id, None)
            return job

    # -- submission -------------------------------------------------------------------------------
    async def on_submit(self, msg: Msg) -> None:
        try:
            request = decode(SubmitRequest, msg.data)
            spec = parse_spec(request.spec)
        except SpecError as exc:
            reply = SubmitReply(
                error=str(exc), problems=[Problem(field=f, message=m) for f, m in exc.problems]
            )
            await msg.respond(encode(reply))
            return
        except ValueError as exc:
            await msg.respond(encode(SubmitReply(error=f"malformed submission: {exc}")))
            return
        job = JobRecord(id=new_job_id(), spec=spec)
        await self.bus.save_job(job)
        self.log.info("job.submitted", job=job.id, image=spec.image)
        await msg.respond(encode(SubmitReply(job_id=job.id)))
        self._spawn(self.drive(job.id), f"drive-{job.id}")

    # -- bidding ----------------------------------------------------------------------------------
    async def on_bid(self, msg: Msg) -> None:
        try:
            bid = decode(Bid, msg.data)
        except ValueError:
            return
        bids = self._bids.get(bid.job_id)
        if bids is None:  # bidding is over for this job: free the worker at once
            self._spawn(self._reject(bid.job_id, bid.node_id, "bidding closed"), "late-bid")
            return
        if any(b.node_id == bid.node_id for b in bids):
            return
        bids.append(bid)
        self._bid_arrived[bid.job_id].set()

    async def _reject(self, job_id: str, node_id: str, reason: str) -> None:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.bus.request(
                subjects.assign(node_id),
                Assignment(job_id=job_id, accepted=False, reason=reason),
                AssignmentReply,
                timeout=ASSIGN_TIMEOUT,
            )

    async def drive(self, job_id: str) -> None:
        """Take a job from pending (or bidding) to running; then watch its result deadline."""
        try:
            job = await self.bus.load_job(job_id)
            if job is None or job.final:
                return
            if job.state in (JobState.PENDING, JobState.BIDDING):
                job = await self._bidding(job)
                if job is None or job.final:
                    return
            await self._watch_deadline(job)
        except Exception:
            self.log.exception("job.drive_crashed", job=job_id)
            await self.mutate(
                job_id, lambda j: move_job(j, JobState.FAILED, "internal requester error")
            )

    async def _bidding(self, job: JobRecord) -> JobRecord | None:
        spec = job.spec
        need = max(spec.concurrency, spec.min_bids)
        self._bids[job.id] = []
        arrived = self._bid_arrived[job.id] = asyncio.Event()
        sub = await self.bus.subscribe(subjects.bids(job.id), self.on_bid)
        try:
            await self.mutate(
                job.id, lambda j: move_job(j, JobState.BIDDING, f"waiting for {need} bid(s)")
            )
            deadline = now() + timedelta(seconds=spec.bid_timeout)
            announcement = Announcement(job_id=job.id, spec=spec, bid_deadline=deadline)
            loop = asyncio.get_running_loop()
            end = loop.time() + spec.bid_timeout
            while len(self._bids[job.id]) < need and loop.time() < end:
                await self.bus.publish(subjects.ANNOUNCE, announcement)
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        arrived.wait(), timeout=min(REANNOUNCE_EVERY, max(0.0, end - loop.time()))
                    )
                    # a burst of bids: let the rest of it land before counting again
                    await asyncio.sleep(0.05)
        finally:
            await sub.unsubscribe()
            bids = self._bids.pop(job.id, [])
            self._bid_arrived.pop(job.id, None)

        def record_bids(j: JobRecord) -> bool:
            changed = False
            for bid in bids:
                changed |= move_exec(j, bid.node_id, ExecState.BID)
            return changed

        await self.mutate(job.id, record_bids)
        if len(bids) < need:
            return await self._not_enough_bids(job.id, spec, bids, need)
        return await self._assign(job.id, spec, bids)

    async def _not_enough_bids(
        self, job_id: str, spec: JobSpec, bids: list[Bid], need: int
    ) -> JobRecord | None:
        parts = [f"concurrency {spec.concurrency}"]
        if spec.min_bids:
            parts.append(f"min_bids {spec.min_bids}")
        if spec.node_selector:
            labels = ",".join(f"{k}={v}" for k, v in spec.node_selector.items())
            parts.append(f"node_selector {labels}")
        reason = (
            f"not enough bids: {len(bids)} of the {need} needed ({', '.join(parts)}) "
            f"within {spec.bid_timeout:g}s"
        )
        await asyncio.gather(*(self._reject(job_id, b.node_id, reason) for b in bids))

        def fail(j: JobRecord) -> bool:
            for bid in bids:
                move_exec(j, bid.node_id, ExecState.BID_REJECTED, detail="job failed: " + reason)
            return move_job(j, JobState.FAILED, reason)

        self.log.info("job.no_bids", job=job_id, reason=reason)
        return await self.mutate(job_id, fail)

    async def _assign(self, job_id: str, spec: JobSpec, bids: list[Bid]) -> JobRecord | None:
        chosen, others = bids[: spec.concurrency], bids[spec.concurrency :]

        def choose(j: JobRecord) -> bool:
            for bid in chosen:
                move_exec(j, bid.node_id, ExecState.ACCEPTED, detail="bid accepted")
            for bid in others:
                move_exec(j, bid.node_id, ExecState.BID_REJECTED, detail="other workers chosen")
            return move_job(j, JobState.RUNNING, f"running on {len(chosen)} worker(s)")

        # recorded before the workers hear of it, so no result can arrive for an unknown node
        await self.mutate(job_id, choose)
        await asyncio.gather(
            *(self._reject(job_id, b.node_id, "other workers chosen") for b in others),
            *(self._send_assignment(job_id, spec, b.node_id) for b in chosen),
        )
        return await self.bus.load_job(job_id)

    async def _send_assignment(self, job_id: str, spec: JobSpec, node_id: str) -> None:
        error: str | None
        try:
            reply = await self.bus.request(
                subjects.assign(node_id),
                Assignment(job_id=job_id, accepted=True, spec=spec),
                AssignmentReply,
                timeout=ASSIGN_TIMEOUT,
            )
            error = None if reply.ok else f"worker {node_id} declined: {reply.error}"
        except (nats.errors.Error, TimeoutError) as exc:
            error = f"worker {node_id} did not confirm the assignment ({type(exc).__name__})"
        if error is None:
            return
        self.log.warning("assign.failed", job=job_id, node=node_id, error=error)
        # the verifier counts every chosen worker's answer: this one answers with the error
        await self.bus.publish_durable(
            subjects.verify(job_id, node_id),
            ResultMessage(job_id=job_id, node_id=node_id, error=error),
            msg_id=f"verify.{job_id}.{node_id}",
        )
        await self.bus.publish_durable(
            subjects.exec_update(job_id, node_id),
            ExecUpdate(job_id=job_id, node_id=node_id, state=ExecState.FAILED, error=error),
            msg_id=f"exec.{job_id}.{node_id}.failed",
        )

    async def _watch_deadline(self, job: JobRecord) -> None:
        """Fail the job, naming the silent workers, when no verdict comes in time."""
        spec = job.spec
        started = job.updated_at
        limit = spec.timeout + self.result_grace
        remaining = limit - (now() - started).total_seconds()
        while remaining > 0:
            await asyncio.sleep(min(remaining, 5.0))
            current = await self.bus.load_job(job.id)
            if current is None or current.final:
                return
            remaining = limit - (now() - started).total_seconds()

        def expire(j: JobRecord) -> bool:
            silent = [e.node_id for e in j.executions.values() if e.state in EXEC_ACTIVE]
            if silent:
                reason = (
                    f"no result from {', '.join(sorted(silent))} within {limit:g}s "
                    f"(timeout {spec.timeout:g}s + {self.result_grace:g}s grace)"
                )
                for node_id in silent:
                    move_exec(j, node_id, ExecState.FAILED, error="no result before the deadline")
            else:
                reason = f"no verdict within {limit:g}s of the job starting"
            return move_job(j, JobState.FAILED, reason)

        await self.mutate(job.id, expire)

    # -- progress and verdicts --------------------------------------------------------------------
    async def _fold(self, filter_subject: str, durable: str, kind: str) -> None:
        async for msg in self.bus.consume(filter_subject, durable):
            try:
                if kind == "exec":
                    update = decode(ExecUpdate, msg.data)
                    job = await self.mutate(update.job_id, partial(_apply_update, update=update))
                    self.log.debug(
                        "exec.update",
                        job=update.job_id,
                        node=update.node_id,
                        state=update.state,
                        applied=job is not None,
                    )
                else:
                    verdict = decode(Verdict, msg.data)
                    await self.mutate(verdict.job_id, partial(_apply_verdict, verdict=verdict))
                    self.log.info(
                        "job.verdict",
                        job=verdict.job_id,
                        outcome=verdict.outcome,
                        reason=verdict.reason,
                    )
            except ValueError as exc:
                self.log.warning("message.malformed", subject=msg.subject, error=str(exc))
            await msg.ack()

    async def _resume(self) -> None:
        for job_id in await self.bus.job_ids():
            job = await self.bus.load_job(job_id)
            if job is not None and not job.final:
                self.log.info("job.resumed", job=job_id, state=job.state)
                self._spawn(self.drive(job_id), f"drive-{job_id}")

    async def serve(self, stop: asyncio.Event) -> None:
        submit_sub = await self.bus.subscribe(subjects.SUBMIT, self.on_submit, queue="requester")
        folds = [
            asyncio.create_task(
                self._fold(subjects.EXEC_ALL, subjects.REQUESTER_EXEC_CONSUMER, "exec")
            ),
            asyncio.create_task(
                self._fold(subjects.VERDICT_ALL, subjects.REQUESTER_VERDICT_CONSUMER, "verdict")
            ),
        ]
        await self._resume()
        await self.bus.nc.flush()
        self.log.info("service.ready", service="requester")
        try:
            await stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await submit_sub.unsubscribe()
            for task in [*folds, *self._tasks]:
                task.cancel()
            await asyncio.gather(*folds, *self._tasks, return_exceptions=True)
            self.log.info("service.stopped", service="requester")
