"""The verifier: collects the result CIDs of each job's workers and publishes the verdict.

Touches NATS only: it reads the verification subject (a durable consumer), the job records (to know
the job's verifier, concurrency and which workers were chosen), keeps what it has collected in the
``bacq-results`` bucket so that a restart loses nothing, and publishes one verdict per job.
"""

from __future__ import annotations

import asyncio

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from bacq import sdnotify, subjects
from bacq.bus import Bus, ensure_bucket
from bacq.log import get_logger
from bacq.models import ResultMessage, decode, encode
from bacq.states import ExecState
from bacq.verify.logic import decide

__all__ = ["Verifier"]

# executions whose result counts: the requester chose them and did not give up on them
_COUNTED = frozenset(ExecState) - {
    ExecState.BID,
    ExecState.BID_REJECTED,
    ExecState.LOST,
    ExecState.CANCELLED,
}


class Collected(BaseModel):
    results: list[ResultMessage] = Field(default_factory=list)
    decided: bool = False
    ignored: list[str] = Field(default_factory=list)


IN_FLIGHT = 256  # results being handled at once (one job's in order, under its lock)


class Verifier:
    def __init__(self, bus: Bus, results: KeyValue) -> None:
        self.bus = bus
        self.results = results
        self.log = get_logger("bacq.verifier")
        # the single writer's copy of what it collected for undecided jobs (saved on each change)
        self._collected: dict[str, Collected] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # job → its lock, tasks using it
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def create(cls, bus: Bus) -> Verifier:
        return cls(bus, await ensure_bucket(bus.js, subjects.RESULTS_BUCKET))

    async def _load(self, job_id: str) -> Collected:
        cached = self._collected.get(job_id)
        if cached is not None:
            return cached
        try:
            entry = await self.results.get(job_id)
        except KeyNotFoundError:
            return Collected()
        return decode(Collected, entry.value) if entry.value else Collected()

    async def _save(self, job_id: str, collected: Collected) -> None:
        await self.results.put(job_id, encode(collected))
        if collected.decided:
            self._collected.pop(job_id, None)
        else:
            self._collected[job_id] = collected

    async def handle(self, msg: Msg) -> None:
        """Count one worker's result and publish the verdict once there is one; one job's
        results are handled one at a time, in the order they came."""
        result = decode(ResultMessage, msg.data)
        lock, users = self._locks.get(result.job_id, (asyncio.Lock(), 0))
        self._locks[result.job_id] = (lock, users + 1)
        try:
            async with lock:
                await self._handle(msg, result)
        finally:
            lock, users = self._locks[result.job_id]
            if users == 1:
                del self._locks[result.job_id]
            else:
                self._locks[result.job_id] = (lock, users - 1)

    async def _handle(self, msg: Msg, result: ResultMessage) -> None:
        subject_node = msg.subject.rsplit(".", 1)[-1]
        log = self.log.bind(job=result.job_id, node=result.node_id)
        collected = await self._load(result.job_id)
        if collected.decided:
            log.info("result.after_verdict")
            return
        job = await self.bus.load_job(result.job_id)
        if subject_node != result.node_id:
            reason = f"result for {result.node_id} sent on {subject_node}'s subject"
        elif job is None:
            reason = "unknown job"
        elif result.node_id not in job.executions:
            reason = "worker was not chosen for this job"
        elif job.executions[result.node_id].state not in _COUNTED:
            state = job.executions[result.node_id].state.value
            reason = f"late result from a {state} execution: recorded, not counted"
        elif any(r.node_id == result.node_id for r in collected.results):
            log.debug("result.duplicate")
            return
        else:
            reason = ""
        if reason or job is None:
            log.warning("result.ignored", reason=reason)
            collected.ignored.append(f"{result.node_id}: {reason}")
            await self._save(result.job_id, collected)
            return
        collected.results.append(result)
        spec = job.spec
        # an execution lost after its result came in no longer counts: its replacement will
        counted = [
            r
            for r in collected.results
            if r.node_id in job.executions and job.executions[r.node_id].state in _COUNTED
        ]
        verdict = decide(job.id, spec.verifier, spec.concurrency, spec.confidence, counted)
        if verdict is not None:
            collected.decided = True
        await self._save(result.job_id, collected)
        log.info(
            "result.collected",
            cid=result.cid,
            error=result.error,
            have=len(collected.results),
            of=spec.concurrency,
        )
        if verdict is not None:
            await self.bus.publish_durable(
                subjects.verdict(job.id), verdict, msg_id=f"verdict.{job.id}"
            )
            log.info(
                "verdict", outcome=verdict.outcome, reason=verdict.reason, cid=verdict.result_cid
            )

    async def _handle_and_ack(self, msg: Msg, slots: asyncio.Semaphore) -> None:
        try:
            try:
                await self.handle(msg)
            except ValueError as exc:
                self.log.warning("result.malformed", subject=msg.subject, error=str(exc))
            await msg.ack()
        except (nats.errors.Error, TimeoutError) as exc:
            # not acked: delivered again after the consumer's ack_wait
            self.log.warning("result.failed", subject=msg.subject, error=type(exc).__name__)
        finally:
            slots.release()

    async def serve(self, stop: asyncio.Event) -> None:
        async def loop() -> None:
            slots = asyncio.Semaphore(IN_FLIGHT)
            async for msg in self.bus.consume(
                subjects.VERIFY_ALL, subjects.VERIFIER_CONSUMER, batch=IN_FLIGHT
            ):
                await slots.acquire()
                task = asyncio.create_task(self._handle_and_ack(msg, slots))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        task = asyncio.create_task(loop())
        await self.bus.nc.flush()
        self.log.info("service.ready", service="verifier")
        sdnotify.ready()
        try:
            await stop.wait()
        finally:
            for pending in [task, *self._tasks]:
                pending.cancel()
            await asyncio.gather(task, *self._tasks, return_exceptions=True)
            self.log.info("service.stopped", service="verifier")
