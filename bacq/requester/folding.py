"""Folding: worker progress and the verifier's verdicts into the job records. Touches NATS."""

from __future__ import annotations

import asyncio
from functools import partial

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from bacq import metrics, subjects
from bacq.bus import last_delivery
from bacq.models import (
    ExecUpdate,
    JobRecord,
    Verdict,
    decode,
)
from bacq.requester._base import FOLD_IN_FLIGHT, Step
from bacq.requester.record import apply_exec_update, apply_verdict
from bacq.requester.watchdog import Watchdog
from bacq.states import ExecState, JobState


class Folding(Watchdog):
    # -- progress and verdicts --------------------------------------------------------------------
    async def _fold(self) -> None:
        """Fold progress messages and verdicts into the records, many at once.

        Two consumers (progress in the BACQ stream, verdicts in BACQ_VERDICTS) feed one queue;
        what is waiting there is taken together and grouped by job: each job's group is one
        commit (its events as if applied one by one), in a task of its own. Tasks take their
        job's lock in the order their messages came, so one job's updates apply in order.
        A message that does not fit is dead-lettered, never redelivered forever."""
        slots = asyncio.Semaphore(FOLD_IN_FLIGHT)
        queue: asyncio.Queue[list[Msg]] = asyncio.Queue(maxsize=4)

        async def feed(filter_subject: str, durable: str, stream: str) -> None:
            async for msgs in self.bus.consume_batches(
                filter_subject, durable, stream=stream, batch=FOLD_IN_FLIGHT
            ):
                await queue.put(msgs)

        feeders = [
            asyncio.create_task(
                feed(subjects.EXEC_ALL, subjects.REQUESTER_CONSUMER, subjects.STREAM)
            ),
            asyncio.create_task(
                feed(
                    subjects.VERDICT_ALL,
                    subjects.REQUESTER_VERDICT_CONSUMER,
                    subjects.VERDICTS_STREAM,
                )
            ),
        ]
        try:
            while True:
                msgs = await queue.get()
                while not queue.empty():
                    msgs += queue.get_nowait()
                groups: dict[str, list[tuple[Msg, Step]]] = {}
                for msg in msgs:
                    folded = self._step(msg)
                    if isinstance(folded, str):
                        await self.bus.dead_letter(msg, subjects.REQUESTER_CONSUMER, folded)
                        continue
                    if folded is None:
                        await msg.ack()
                        continue
                    job_id, step = folded
                    groups.setdefault(job_id, []).append((msg, step))
                for job_id, group in groups.items():
                    await slots.acquire()
                    self._spawn(self._fold_group(job_id, group, slots), "fold")
        finally:
            for feeder in feeders:
                feeder.cancel()
            await asyncio.gather(*feeders, return_exceptions=True)

    async def remember_answer(self, job: JobRecord) -> None:
        """(Intake's part: ``Intake.remember_answer``.)"""

    def _step(self, msg: Msg) -> tuple[str, Step] | str | None:
        """The change ``msg`` makes to its job record; None: nothing to fold; a string: why the
        message cannot be used (it is dead-lettered and counted against its node)."""
        if msg.subject.startswith(subjects.VERDICT_ALL[:-1]):
            # only the verifier can publish there (NATS permissions)
            try:
                verdict = decode(Verdict, msg.data)
            except ValueError as exc:
                return f"not a verdict: {str(exc)[:300]}"
            if msg.subject != subjects.verdict(verdict.job_id):
                return f"a verdict for {verdict.job_id[:80]!r} on {msg.subject}"
            self.log.info(
                "job.verdict", job=verdict.job_id, outcome=verdict.outcome, reason=verdict.reason
            )
            metrics.VERDICTS.labels(verdict.outcome).inc()
            for node_id, node in verdict.nodes.items():
                if node.verified:
                    self.reputations.count(node_id, "verified")
                elif node.error is not None:
                    self.reputations.count(node_id, "failed")
                elif verdict.outcome == "accepted":
                    self.reputations.count(node_id, "rejected")
            return verdict.job_id, (partial(apply_verdict, verdict=verdict), "verifier")
        try:
            job_id, node_id = subjects.job_and_node(msg.subject)
        except ValueError as exc:
            return str(exc)
        if not subjects.is_token(job_id):
            self._offence(node_id, "malformed", f"{msg.subject}: not a job id")
            return f"{job_id[:80]!r} is not a job id"
        update = self._checked(msg, node_id, ExecUpdate)
        if update is None:
            return f"not a progress message from {node_id}"
        if update.job_id != job_id or update.node_id != node_id:
            what = f"progress for {update.job_id[:80]!r}/{update.node_id[:80]!r} on {msg.subject}"
            self._offence(node_id, "forged", what)
            return f"forged: {what}"
        # a worker says how far it got; what it computed (exit code, CID) comes with the verdict
        update = update.model_copy(
            update={
                "exit_code": None,
                "detail": update.detail[:500],
                "error": None if update.error is None else update.error[:2000],
            }
        )
        if update.state == ExecState.LOST:  # handed back by a draining worker
            reason = update.error or f"worker {node_id} handed the job back"
            self._spawn(self._lose(job_id, node_id, reason), "handback")
            return None
        return job_id, (partial(apply_exec_update, update=update), node_id)

    async def _fold_group(
        self,
        job_id: str,
        group: list[tuple[Msg, Step]],
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            job = await self.mutate_steps(job_id, [step for _, step in group])
            if job is not None and job.state == JobState.ACCEPTED:
                await self.remember_answer(job)
            for msg, _ in group:
                await msg.ack()
        except (nats.errors.Error, TimeoutError) as exc:
            # not acked: JetStream delivers them again after the consumer's ack_wait, up to
            # MAX_DELIVER times (then they are dead letters)
            self.log.warning("fold.failed", job=job_id, error=type(exc).__name__)
            for msg, _ in group:
                if last_delivery(msg):
                    await self.bus.dead_letter(
                        msg, subjects.REQUESTER_CONSUMER, f"could not be folded: {exc!r}"
                    )
        except Exception as exc:  # a bug must not block the consumer
            self.log.exception("fold.crashed", job=job_id)
            for msg, _ in group:
                await self.bus.dead_letter(
                    msg, subjects.REQUESTER_CONSUMER, f"internal requester error: {exc!r}"
                )
        finally:
            slots.release()
