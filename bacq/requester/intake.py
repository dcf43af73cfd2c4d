"""Intake: submissions (one or many, idempotent by key) and cancellations. Touches NATS."""

from __future__ import annotations

import asyncio
import contextlib
import json

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from bacq import subjects
from bacq.errors import SpecError
from bacq.events import diff, fold
from bacq.models import (
    CancelReply,
    CancelRequest,
    JobRecord,
    Problem,
    ReleaseReply,
    ReleaseRequest,
    SubmitManyReply,
    SubmitManyRequest,
    SubmitReply,
    SubmitRequest,
    decode,
    encode,
    new_job_id,
)
from bacq.requester._base import idempotency_slot
from bacq.requester.answers import answer_key
from bacq.requester.folding import Folding
from bacq.requester.record import move_exec, move_job
from bacq.spec import parse_spec
from bacq.states import EXEC_ACTIVE, ExecState, JobState


class Intake(Folding):
    # -- submission and cancellation --------------------------------------------------------------
    async def on_submit(self, msg: Msg) -> None:
        # a subscription's callback runs one message at a time: take submissions concurrently
        self._spawn(self._submit(msg), "submit")

    async def _submit(self, msg: Msg) -> None:
        try:
            request = decode(SubmitRequest, msg.data)
        except ValueError as exc:
            await msg.respond(encode(SubmitReply(error=f"malformed submission: {exc}")))
            return
        reply, new = await self._accept(request.spec, request.idempotency_key)
        await msg.respond(encode(reply))
        if new and reply.job_id is not None:  # (a repeated submission is queued already)
            self._enqueue(reply.job_id)

    async def on_submit_many(self, msg: Msg) -> None:
        self._spawn(self._submit_many(msg), "submit-many")

    async def _submit_many(self, msg: Msg) -> None:
        """Up to ``SUBMIT_MANY_MAX`` specs in one request: each is taken (or refused with its
        problems) as if submitted alone, all committed at once; the jobs join the queue in the
        request's order once every one is recorded."""
        try:
            request = decode(SubmitManyRequest, msg.data)
            keys = request.idempotency_keys or [None] * len(request.specs)
            if len(request.specs) > subjects.SUBMIT_MANY_MAX:
                raise ValueError(
                    f"{len(request.specs)} specs in one request; at most "
                    f"{subjects.SUBMIT_MANY_MAX} (split the batch)"
                )
            if len(keys) != len(request.specs):
                raise ValueError(
                    f"{len(keys)} idempotency keys for {len(request.specs)} specs; give one "
                    "per spec (null for none) or none at all"
                )
        except ValueError as exc:
            await msg.respond(encode(SubmitManyReply(error=f"malformed submission: {exc}")))
            return
        ids: list[str | None] = [None] * len(request.specs)
        again = False
        if request.batch_key:
            try:
                ids, again = await self._claim_batch(request.batch_key, len(request.specs))
            except ValueError as exc:
                await msg.respond(encode(SubmitManyReply(error=str(exc))))
                return
        replies = await self._accept_many(
            [
                (spec, key, job_id, again)
                for spec, key, job_id in zip(request.specs, keys, ids, strict=True)
            ]
        )
        await msg.respond(encode(SubmitManyReply(results=[reply for reply, _ in replies])))
        for reply, new in replies:
            if new and reply.job_id is not None:
                self._enqueue(reply.job_id)

    async def _claim_batch(self, batch_key: str, count: int) -> tuple[list[str | None], bool]:
        """The job ids of a batch: new ones bound to ``batch_key``, or (True) the ones a first
        attempt of the same batch bound to it."""
        slot = idempotency_slot(f"batch:{batch_key}")
        ids = [new_job_id() for _ in range(count)]
        try:
            await self._idempotency.create(slot, json.dumps(ids).encode())
            return list(ids), False
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await self._idempotency.get(slot)
        try:
            known = json.loads(entry.value or b"[]")
        except ValueError:
            known = None
        if not isinstance(known, list) or len(known) != count:
            raise ValueError(
                f"batch_key {batch_key[:80]!r} was used for another batch: give each batch its own"
            )
        return [str(i) for i in known], True

    async def _accept(self, raw: dict[str, object], key: str | None) -> tuple[SubmitReply, bool]:
        """Record one submitted spec as a new pending job (or find the job its key made); also
        returns whether the job was recorded now (and is to be queued)."""
        return (await self._accept_many([(raw, key, None, False)]))[0]

    async def _accept_many(
        self, submitted: list[tuple[dict[str, object], str | None, str | None, bool]]
    ) -> list[tuple[SubmitReply, bool]]:
        """Record submitted specs (each with its idempotency key, the job id to give it or None,
        and whether a retried batch's first attempt may have recorded it already) as new pending
        jobs, all committed at once (``Ledger._commit_many``: two JetStream waits for the lot).
        Returns, per spec, its reply and whether its job was recorded now (and is to be queued).
        """
        found: list[JobRecord | SubmitReply] = []
        waits: list[int] = []  # specs that need a look at JetStream first (keys, a retry)
        for index, (raw, key, job_id, again) in enumerate(submitted):
            if key or (again and job_id is not None):
                waits.append(index)
                found.append(SubmitReply())  # (replaced below)
            else:
                found.append(self._new_record(raw, None, job_id))
        if waits:
            looked = await asyncio.gather(*(self._prepare(*submitted[i]) for i in waits))
            for index, outcome in zip(waits, looked, strict=True):
                found[index] = outcome
        fresh = [job for job in found if isinstance(job, JobRecord)]
        if fresh:
            await self._commit_many(
                [(job, diff(None, job, actor="client"), job.last_hash) for job in fresh]
            )
            for job in fresh:
                self._keep(job)
            if len(fresh) == 1:
                self.log.info("job.submitted", job=fresh[0].id, image=fresh[0].spec.image)
            else:
                self.log.info("jobs.submitted", count=len(fresh), jobs=[job.id for job in fresh])
            keyed = [(job, key) for job in fresh if (key := answer_key(job.spec)) is not None]
            if keyed and self._answers is not None:
                await asyncio.gather(*(self._known_answer(job, key) for job, key in keyed))
        return [
            (SubmitReply(job_id=job.id), True) if isinstance(job, JobRecord) else (job, False)
            for job in found
        ]

    async def _prepare(
        self, raw: dict[str, object], key: str | None, job_id: str | None, again: bool
    ) -> JobRecord | SubmitReply:
        """The new job record of a submitted spec, or the reply when there is none to make: its
        problems, or the job its idempotency key (or a batch's first attempt) made already."""
        if again and job_id is not None and await self._recorded(job_id, key):
            return SubmitReply(job_id=job_id)
        job = self._new_record(raw, key, job_id)
        if key and isinstance(job, JobRecord):
            existing = await self._claim_key(key, job.id)
            if existing is not None:
                self.log.info("job.duplicate_submission", job=existing)
                return SubmitReply(job_id=existing)
        return job

    @staticmethod
    def _new_record(
        raw: dict[str, object], key: str | None, job_id: str | None
    ) -> JobRecord | SubmitReply:
        """A new job record of a submitted spec, or the reply naming its problems."""
        try:
            spec = parse_spec(raw)
        except SpecError as exc:
            problems = [Problem(field=f, message=m) for f, m in exc.problems]
            return SubmitReply(error=str(exc), problems=problems)
        except ValueError as exc:
            return SubmitReply(error=f"malformed submission: {exc}")
        return JobRecord(id=job_id or new_job_id(), spec=spec, idempotency_key=key)

    async def _known_answer(self, job: JobRecord, key: str) -> None:
        """Answer a deterministic job from an accepted equal one (its ``answer_key`` is
        ``key``), if there is one."""
        try:
            entry = await self._answers.get(key)
        except nats.js.errors.KeyNotFoundError:
            return
        source = await self.bus.load_job((entry.value or b"").decode())
        if source is None or source.state != JobState.ACCEPTED or source.result_cid is None:
            return

        def answer(j: JobRecord) -> bool:
            reason = (
                f"known answer: job {source.id} ran this spec on these inputs and was accepted "
                f"({source.reason}); --no-cache runs it again"
            )
            if not move_job(j, JobState.ACCEPTED, reason):
                return False
            j.result_cid, j.exit_code = source.result_cid, source.exit_code
            return True

        if await self.mutate(job.id, answer) is not None:
            self.log.info("job.known_answer", job=job.id, source=source.id)

    async def remember_answer(self, job: JobRecord) -> None:
        """An accepted deterministic job: its result answers equal jobs from now on."""
        key = answer_key(job.spec)
        if key is None or self._answers is None or job.result_cid is None:
            return
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._answers.put(key, job.id.encode())

    async def _claim_key(self, key: str, job_id: str) -> str | None:
        """Bind ``key`` to ``job_id``; if a job already holds it, return that job's id instead."""
        slot = idempotency_slot(key)
        try:
            await self._idempotency.create(slot, job_id.encode())
            return None
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await self._idempotency.get(slot)
            existing = (entry.value or b"").decode()
        if not await self._recorded(existing, key):
            await self._idempotency.put(slot, job_id.encode())
            return None
        return existing

    async def _recorded(self, job_id: str, key: str | None) -> bool:
        """Whether a job ``job_id`` exists; one whose first attempt died between publishing
        its events and saving its record is finished from its events (and queued)."""
        if job_id in self._records or await self.bus.load_job(job_id) is not None:
            return True
        events = await self.bus.job_events(job_id)
        if not events:
            return False
        job = fold(events)
        job.idempotency_key = key
        self._revisions[job.id] = await self.bus.save_job(job, revision=0)
        self._keep(job)
        self._enqueue(job_id)
        return True

    async def on_release(self, msg: Msg) -> None:
        """``bacq nodes release NODE``: lift a node's quarantine (its counts stay)."""
        try:
            request = decode(ReleaseRequest, msg.data)
        except ValueError as exc:
            await msg.respond(encode(ReleaseReply(ok=False, error=f"malformed: {exc}")))
            return
        node_id = request.node_id
        if not subjects.is_token(node_id):
            await msg.respond(encode(ReleaseReply(ok=False, error=f"{node_id!r} is no node id")))
            return
        if self.reputations.quarantined(node_id) is None:
            await msg.respond(
                encode(ReleaseReply(ok=False, error=f"node {node_id} is not quarantined"))
            )
            return
        self.reputations.release(node_id)
        await self.reputations.flush()
        self.log.info("node.released", node=node_id)
        self._wake.set()
        await msg.respond(encode(ReleaseReply(ok=True)))

    async def on_cancel(self, msg: Msg) -> None:
        try:
            request = decode(CancelRequest, msg.data)
        except ValueError as exc:
            await msg.respond(encode(CancelReply(ok=False, error=f"malformed: {exc}")))
            return
        stopped: list[str] = []
        cancelled = False

        def cancel(job: JobRecord) -> bool:
            nonlocal cancelled
            if job.final:
                return False
            for execution in job.executions.values():
                if execution.state in EXEC_ACTIVE:
                    stopped.append(execution.node_id)
                    move_exec(job, execution.node_id, ExecState.CANCELLED, detail="job cancelled")
                elif execution.state == ExecState.BID:
                    move_exec(
                        job, execution.node_id, ExecState.BID_REJECTED, detail="job cancelled"
                    )
            cancelled = move_job(job, JobState.CANCELLED, "cancelled on request")
            return cancelled

        job = await self.mutate(request.job_id, cancel, actor="client")
        if job is None:
            await msg.respond(encode(CancelReply(ok=False, error=f"no job {request.job_id}")))
            return
        if not cancelled:
            await msg.respond(
                encode(
                    CancelReply(
                        ok=False,
                        state=job.state.value,
                        error=f"job {job.id} already ended: {job.state.value}",
                    )
                )
            )
            return
        await asyncio.gather(*(self._stop_on(job.id, node) for node in stopped))
        self.log.info("job.cancelled", job=job.id, stopped=stopped)
        await msg.respond(encode(CancelReply(ok=True, state=job.state.value, stopped=stopped)))

    async def _stop_on(self, job_id: str, node_id: str) -> None:
        try:
            await self.bus.request(
                subjects.cancel(node_id), CancelRequest(job_id=job_id), CancelReply, timeout=30
            )
        except (nats.errors.Error, TimeoutError) as exc:
            self.log.warning(
                "cancel.unanswered", job=job_id, node=node_id, error=type(exc).__name__
            )
