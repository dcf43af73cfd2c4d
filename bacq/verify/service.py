"""The verifier: collects each job's commitments, asks for the reveals, publishes the verdict.

Touches NATS only: it reads the verification subject (a durable consumer), the job records (to
know the job's verifier, concurrency and which workers were chosen), asks chosen workers for their
reveal (``bacq.node.<node>.reveal``), keeps what it has collected in the ``bacq-results`` bucket
so that a restart loses nothing, counts offences in ``bacq-reputation`` and publishes one verdict
per job into the ``BACQ_VERDICTS`` stream, which no worker may write.

Commit, then reveal: a worker first sends only a commitment (a hash of its result CID, exit code,
node id and a secret nonce) and publishes no block of its results. Once the verifier holds an
answer from every chosen worker (``concurrency`` of them; the first one for the noop verifier), it
asks the committed ones to reveal; a reveal that does not match its commitment, or that does not
come within ``REVEAL_TIMEOUT``, counts as that worker's error and against its node. So no worker
can learn another's result before it has committed to its own. A job with nothing to copy (one
worker: ``commit_reveal``) skips the round: its worker sends its result at once.

Every message is checked: job and node come from the subject and must equal the payload's, the
job must exist and have chosen that node. What does not fit is dead-lettered (``BACQ_DEAD``) and
counted against the node the subject names; nothing is redelivered forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
from collections.abc import AsyncIterator, Coroutine
from functools import partial
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from bacq import metrics, sdnotify, subjects
from bacq.bus import Bus, again, ensure_bucket, last_delivery, new_nonce
from bacq.errors import Fenced
from bacq.faults import crash_point
from bacq.lease import Lease
from bacq.log import get_logger
from bacq.models import (
    REVEAL_BATCH_MAX,
    JobRecord,
    ResultMessage,
    RevealReply,
    RevealRequest,
    Verdict,
    commit_reveal,
    commitment_of,
    decode,
    encode,
    now,
)
from bacq.reputation import Reputations
from bacq.states import ExecState
from bacq.terms import STOP_STEP, stop_tasks
from bacq.verify.logic import decide

__all__ = ["Verifier"]

# executions whose result counts: the requester chose them and did not give up on them
_COUNTED = frozenset(ExecState) - {
    ExecState.BID,
    ExecState.BID_REJECTED,
    ExecState.LOST,
    ExecState.CANCELLED,
}
IN_FLIGHT = 256  # results being handled at once (one job's in order, under its lock)
MAX_RESULT_BYTES = 16 * 1024  # a result message is a few hundred bytes
MAX_IGNORED = 32  # notes kept per job about results that did not count
REVEAL_TIMEOUT = 60.0  # seconds a committed worker has to reveal once asked
REVEAL_ASK_EVERY = 5.0  # seconds between requests to a worker that has not revealed yet
REVEAL_REPLY_WAIT = 5.0
SWEEP_EVERY = 2.0
LOOK_EVERY = 30.0  # seconds between the sweep's reads of a job record it has no reveal due for
REVEAL_BATCH_WAIT = 0.005  # seconds asks for one node gather before they go out together
MAX_ERROR = 2000  # characters of a worker's error kept (it goes into the verdict and the record)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Collected(BaseModel):
    """What the verifier holds for one job (bucket ``bacq-results``, key = job id)."""

    results: list[ResultMessage] = Field(default_factory=list)  # errors and matching reveals
    commitments: dict[str, str] = Field(default_factory=dict)  # node → its commitment
    reveal_asked_at: dt.datetime | None = None
    first_at: dt.datetime | None = None  # the first answer (metrics)
    decided: bool = False
    verdict: Verdict | None = None  # once decided
    published: bool = False  # the verdict is in the stream
    nonce: str = Field(default_factory=new_nonce)  # the verdict's unguessable message id
    ignored: list[str] = Field(default_factory=list)

    def answered(self, node_id: str) -> bool:
        return node_id in self.commitments or any(r.node_id == node_id for r in self.results)

    def revealed(self, node_id: str) -> bool:
        return any(r.node_id == node_id for r in self.results)

    def note(self, text: str) -> None:
        if len(self.ignored) < MAX_IGNORED:
            self.ignored.append(text)


class _Dropped(Exception):
    """A message that cannot be used: dead-lettered with ``reason``, counted as ``kind``."""

    def __init__(self, reason: str, kind: str = "malformed") -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind


def _job_of(subject: str) -> str:
    try:
        return subjects.job_and_node(subject)[0]
    except ValueError:
        return ""


def _counted(job: JobRecord, node_id: str) -> bool:
    execution = job.executions.get(node_id)
    return execution is not None and execution.state in _COUNTED


class Verifier:
    def __init__(self, bus: Bus, results: KeyValue, reputations: Reputations) -> None:
        self.bus = bus
        self.results = results
        self.reputations = reputations
        self.log = get_logger("bacq.verifier")
        # the single writer's copy of what it collected for undecided jobs (saved on each change)
        self._collected: dict[str, Collected] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # job → its lock, tasks using it
        self._tasks: set[asyncio.Task[None]] = set()
        self._asked: dict[str, dict[str, float]] = {}  # job → node → when last asked to reveal
        self._to_ask: dict[str, list[str]] = {}  # node → jobs it is to be asked to reveal
        self._askers: dict[str, asyncio.Task[None]] = {}  # node → the task asking it
        self._looked: dict[str, float] = {}  # job → when the sweep last read its record

    @classmethod
    async def create(cls, bus: Bus) -> Verifier:
        results = await ensure_bucket(bus.js, subjects.RESULTS_BUCKET)
        return cls(bus, results, await Reputations.open(bus))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- what is collected ------------------------------------------------------------------------
    async def _load(self, job_id: str) -> Collected | None:
        cached = self._collected.get(job_id)
        if cached is not None:
            return cached
        found = await self.bus.get_value(subjects.RESULTS_BUCKET, job_id)
        return decode(Collected, found[0]) if found and found[0] else None

    async def _save(self, job_id: str, collected: Collected) -> None:
        await self.bus.put_value(subjects.RESULTS_BUCKET, job_id, encode(collected))
        if collected.decided and collected.published:
            self._collected.pop(job_id, None)
        else:
            self._collected[job_id] = collected

    # -- messages -------------------------------------------------------------------------------
    def _check(self, msg: Msg) -> ResultMessage:
        """One message as a result, or ``_Dropped``: job and node from the subject must be the
        payload's."""
        if len(msg.data) > MAX_RESULT_BYTES:
            raise _Dropped(f"{len(msg.data)} bytes; a result is at most {MAX_RESULT_BYTES}")
        try:
            job_id, node_id = subjects.job_and_node(msg.subject)
        except ValueError as exc:
            raise _Dropped(str(exc)) from None
        try:
            result = decode(ResultMessage, msg.data)
        except ValueError as exc:
            raise _Dropped(f"not a result message: {str(exc)[:300]}") from None
        if result.job_id != job_id or result.node_id != node_id:
            raise _Dropped(
                f"payload speaks for job {result.job_id[:80]!r} node {result.node_id[:80]!r} "
                f"on the subject of job {job_id} node {node_id}",
                "forged",
            )
        return result

    async def _handle_group(self, job_id: str, msgs: list[Msg]) -> None:
        """One job's messages of one fetch, in the order they came, under the job's lock: the
        record read once, what they change saved (or decided) once, then each one acked (or
        dead-lettered: ``_Dropped``). Not acked on a NATS error: they come again."""
        taken: list[tuple[Msg, ResultMessage]] = []
        dropped: list[tuple[Msg, _Dropped]] = []
        for msg in msgs:
            try:
                taken.append((msg, self._check(msg)))
            except _Dropped as exc:
                dropped.append((msg, exc))
        if taken:
            async with self._job_lock(job_id):
                job = await self.bus.load_job(job_id)
                # changes are made to a copy: what is kept is what was saved
                found = await self._load(job_id) if job else None
                collected = found.model_copy(deep=True) if found else Collected() if job else None
                changed = False
                for msg, result in taken:
                    try:
                        if job is None or collected is None:
                            raise _Dropped(f"no job {job_id}")
                        changed = self._apply(job, collected, result) or changed
                    except _Dropped as exc:
                        dropped.append((msg, exc))
                if changed and job is not None and collected is not None:
                    await self._progress(job, collected)
        for msg, why in dropped:
            with contextlib.suppress(ValueError):
                self.reputations.count(subjects.job_and_node(msg.subject)[1], why.kind)
            await self.bus.dead_letter(msg, subjects.VERIFIER_CONSUMER, why.reason)
        gone = {id(m) for m, _ in dropped}
        for msg, _ in taken:
            if id(msg) not in gone:
                await msg.ack()

    @contextlib.asynccontextmanager
    async def _job_lock(self, job_id: str) -> AsyncIterator[None]:
        """One job's messages and its sweep, one at a time; the lock is dropped with its last
        user."""
        lock, users = self._locks.get(job_id, (asyncio.Lock(), 0))
        self._locks[job_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[job_id]
            if users == 1:
                del self._locks[job_id]
            else:
                self._locks[job_id] = (lock, users - 1)

    def _apply(self, job: JobRecord, collected: Collected, result: ResultMessage) -> bool:
        """Count one result in what is collected; True when that changed (to be saved)."""
        job_id, node_id = result.job_id, result.node_id
        log = self.log.bind(job=job_id, node=node_id, kind=result.kind)
        if node_id not in job.executions:
            raise _Dropped(f"{node_id} was not chosen for job {job_id}", "forged")
        if collected.first_at is None:
            collected.first_at = now()
        if collected.decided:
            log.info("result.after_verdict")
            return False
        if not _counted(job, node_id):
            state = job.executions[node_id].state.value
            log.warning("result.ignored", reason=f"late result from a {state} execution")
            collected.note(f"{node_id}: late {result.kind} from a {state} execution, not counted")
            return True
        if result.kind == "reveal":
            if not commit_reveal(job.spec) and node_id not in collected.commitments:
                self._take_open(collected, result)
            else:
                self._take_reveal(collected, result, log)
        elif collected.answered(node_id):
            log.debug("result.duplicate")  # a commitment is never replaced
            return False
        elif result.kind == "commit":
            if not _SHA256.match(result.commitment or ""):
                raise _Dropped(f"{node_id}'s commitment is not a sha256 hex digest")
            collected.commitments[node_id] = result.commitment or ""
        else:
            error = (result.error or "")[:MAX_ERROR]
            collected.results.append(result.model_copy(update={"error": error, "cid": None}))
        return True

    def _take_open(self, collected: Collected, result: ResultMessage) -> None:
        """The result of a job with no commit-reveal (one worker): the one worker says its
        result at once."""
        if collected.revealed(result.node_id):
            raise _Dropped(f"a second result from {result.node_id}")
        if result.cid is None:
            raise _Dropped(f"a result from {result.node_id} without a CID")
        collected.results.append(result.model_copy(update={"commitment": None}))

    def _take_reveal(self, collected: Collected, result: ResultMessage, log: object) -> None:
        node_id = result.node_id
        commitment = collected.commitments.get(node_id)
        if commitment is None or collected.revealed(node_id):
            raise _Dropped(f"a reveal from {node_id} that nothing awaits")
        if (
            result.cid is None
            or result.nonce is None
            or commitment_of(result.cid, result.exit_code, node_id, result.nonce) != commitment
        ):
            self.reputations.count(node_id, "bad_reveals")
            self.log.warning("reveal.mismatch", job=result.job_id, node=node_id)
            collected.results.append(
                ResultMessage(
                    job_id=result.job_id,
                    node_id=node_id,
                    error="its reveal did not match its commitment",
                )
            )
            return
        collected.results.append(result)

    async def _progress(self, job: JobRecord, collected: Collected) -> None:
        """After a change: ask for the reveals once every answer is in; decide once they are."""
        spec = job.spec
        counted = [n for n in job.executions if _counted(job, n)]
        answers = [n for n in counted if collected.answered(n)]
        committed = [n for n in answers if n in collected.commitments]
        ready = len(answers) >= spec.concurrency or (spec.verifier == "noop" and committed)
        if collected.reveal_asked_at is None and ready and committed:
            collected.reveal_asked_at = now()
        if collected.reveal_asked_at is not None:  # (a replacement may commit after the ask)
            asked = self._asked.get(job.id, {})
            for node_id in committed:
                if not collected.revealed(node_id) and node_id not in asked:
                    self._ask(job.id, node_id)
        results = [r for r in collected.results if r.node_id in counted]
        waiting = [n for n in collected.commitments if n in counted and not collected.revealed(n)]
        verdict = None
        if not waiting or spec.verifier == "noop":
            verdict = decide(job.id, spec.verifier, spec.concurrency, spec.confidence, results)
        if verdict is None:
            await self._save(job.id, collected)
            return
        for node_id, node in verdict.nodes.items():
            node.committed = node_id in collected.commitments
        # published, then saved once: a crash in between leaves the message that decided it
        # unacknowledged (it comes again and decides the same, under the same message id when
        # the commitments were saved with their nonce) or, for a sweep's decision, the saved
        # state that the next sweep decides from again
        collected.decided, collected.verdict = True, verdict
        if job.id in self._collected:
            self._collected[job.id] = collected  # the sweep publishes it if the publish fails
        crash_point("verifier.decided")
        await self._publish(job.id, collected)

    async def _publish(self, job_id: str, collected: Collected) -> None:
        verdict = collected.verdict
        assert verdict is not None  # noqa: S101 (only decided jobs come here)
        await self.bus.publish_durable(
            subjects.verdict(job_id), verdict, msg_id=f"verdict.{job_id}.{collected.nonce}"
        )
        collected.published = True
        await self._save(job_id, collected)
        self._asked.pop(job_id, None)
        self._looked.pop(job_id, None)
        if collected.first_at is not None:
            seconds = (now() - collected.first_at).total_seconds()
            metrics.VERIFICATION_SECONDS.observe(seconds)
        self.log.info(
            "verdict",
            job=job_id,
            outcome=verdict.outcome,
            reason=verdict.reason,
            cid=verdict.result_cid,
        )

    def _ask(self, job_id: str, node_id: str) -> None:
        """Ask ``node_id`` to reveal its result for ``job_id``: asks for one node within
        ``REVEAL_BATCH_WAIT`` go out together, up to ``REVEAL_BATCH_MAX`` jobs a request."""
        self._asked.setdefault(job_id, {})[node_id] = asyncio.get_running_loop().time()
        waiting = self._to_ask.setdefault(node_id, [])
        if job_id not in waiting:
            waiting.append(job_id)
        if node_id not in self._askers:
            task = asyncio.create_task(self._ask_node(node_id), name=f"reveal-{node_id}")
            self._askers[node_id] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _ask_node(self, node_id: str) -> None:
        try:
            await asyncio.sleep(REVEAL_BATCH_WAIT)
            while jobs := self._to_ask.get(node_id):
                batch = jobs[:REVEAL_BATCH_MAX]
                del jobs[:REVEAL_BATCH_MAX]
                try:
                    reply = await self.bus.request(
                        subjects.reveal(node_id),
                        RevealRequest(job_id=batch[0], job_ids=batch),
                        RevealReply,
                        timeout=REVEAL_REPLY_WAIT,
                    )
                    if not reply.ok or reply.error:
                        self.log.warning("reveal.refused", node=node_id, error=reply.error)
                except (nats.errors.Error, TimeoutError, ValueError) as exc:
                    # the sweep asks again after REVEAL_ASK_EVERY
                    self.log.info(
                        "reveal.unanswered", node=node_id, jobs=len(batch), error=type(exc).__name__
                    )
        finally:
            self._askers.pop(node_id, None)
            if not self._to_ask.get(node_id):
                self._to_ask.pop(node_id, None)

    # -- deadlines --------------------------------------------------------------------------------
    async def _sweep(self) -> None:
        """Ask again for reveals that are late; past ``REVEAL_TIMEOUT`` count them as errors.
        Forget undecided jobs that ended without a verdict (failed, cancelled)."""
        loop = asyncio.get_running_loop()
        for job_id, collected in list(self._collected.items()):
            try:
                async with self._job_lock(job_id):
                    await self._sweep_one(job_id, collected, loop.time())
            except (nats.errors.Error, TimeoutError) as exc:
                self.log.warning("sweep.failed", job=job_id, error=type(exc).__name__)

    async def _sweep_one(self, job_id: str, collected: Collected, t: float) -> None:
        if collected.decided:
            if not collected.published:
                await self._publish(job_id, collected)
            return
        # the record is read only when there is something to do: a reveal is due (again), or
        # now and then, to forget a job that ended without a verdict (failed, cancelled)
        asked = self._asked.get(job_id, {})
        unrevealed = [n for n in collected.commitments if not collected.revealed(n)]
        waited = (
            (now() - collected.reveal_asked_at).total_seconds()
            if collected.reveal_asked_at is not None
            else 0.0
        )
        due = collected.reveal_asked_at is not None and (
            waited > REVEAL_TIMEOUT
            or any(t - asked.get(n, 0.0) >= REVEAL_ASK_EVERY for n in unrevealed)
        )
        if not due and t - self._looked.get(job_id, 0.0) < LOOK_EVERY:
            return
        self._looked[job_id] = t
        job = await self.bus.load_job(job_id)
        if job is None or job.final:
            self._collected.pop(job_id, None)
            self._asked.pop(job_id, None)
            self._looked.pop(job_id, None)
            return
        if collected.reveal_asked_at is None:
            return
        late = [n for n in unrevealed if _counted(job, n)]
        if not late:
            return
        if waited <= REVEAL_TIMEOUT:
            for node_id in late:
                if t - asked.get(node_id, 0.0) >= REVEAL_ASK_EVERY:
                    self._ask(job_id, node_id)
            return
        for node_id in late:
            self.reputations.count(node_id, "bad_reveals")
            collected.results.append(
                ResultMessage(
                    job_id=job_id,
                    node_id=node_id,
                    error=f"committed, but did not reveal within {REVEAL_TIMEOUT:g}s",
                )
            )
        await self._progress(job, collected)

    async def _recover(self) -> None:
        """On start: every undecided job, and every verdict decided but maybe not published
        (the process died between the two), back in memory; the sweep publishes."""
        for key in await self.bus.kv_keys(subjects.RESULTS_BUCKET):
            with contextlib.suppress(KeyNotFoundError, ValueError):
                entry = await self.results.get(key)
                collected = decode(Collected, entry.value) if entry.value else None
                if collected is not None and not (collected.decided and collected.published):
                    self._collected[key] = collected
        if self._collected:
            self.log.info("verifier.recovered", jobs=len(self._collected))

    # -- the loop ---------------------------------------------------------------------------------
    async def _handle_and_ack(self, job_id: str, msgs: list[Msg], slots: asyncio.Semaphore) -> None:
        try:
            await self._handle_group(job_id, msgs)
        except (nats.errors.Error, TimeoutError) as exc:
            # not acked: delivered again after the consumer's ack_wait, up to MAX_DELIVER times
            self.log.warning("result.failed", job=job_id, error=type(exc).__name__)
            for msg in msgs:
                if last_delivery(msg):
                    await self.bus.dead_letter(
                        msg,
                        subjects.VERIFIER_CONSUMER,
                        f"failed {subjects.MAX_DELIVER} times: {exc}",
                    )
        except Exception as exc:  # a bug must not block the consumer: keep the messages
            self.log.exception("result.crashed", job=job_id)
            for msg in msgs:
                await self.bus.dead_letter(
                    msg, subjects.VERIFIER_CONSUMER, f"internal verifier error: {exc!r}"
                )
        finally:
            slots.release()

    async def serve(self, stop: asyncio.Event) -> None:
        """Verify until ``stop`` is set, in terms: each term waits for the lease (another
        verifier may be active: this one is then a standby) and verifies while it holds it. A
        term ends when the lease is lost; the next starts from what the bucket holds."""
        term: Verifier = self
        while True:
            try:
                await term._term(stop)
                return
            except (Fenced, nats.errors.Error, TimeoutError) as exc:
                if stop.is_set():
                    return
                if isinstance(exc, Fenced):
                    self.log.warning("verifier.deposed", reason=str(exc))
                else:  # NATS away, or JetStream electing a leader, as the term started: again
                    self.log.warning("verifier.term_failed", error=f"{type(exc).__name__}: {exc}")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
                term = type(self)(self.bus, self.results, self.reputations)
                term.reputations = await again(lambda: Reputations.open(self.bus))

    async def _term(self, stop: asyncio.Event) -> None:
        lease = Lease(self.bus, "verifier")
        standby = sdnotify.also_ready(
            partial(self.log.info, "service.ready", service="verifier", standby=True)
        )
        if not await lease.acquire(stop, on_standby=standby):
            return
        try:
            await self._serve_active(stop, lease)
        finally:
            await lease.release()
        if lease.lost.is_set():
            raise Fenced("another verifier took over; this one stopped (it may start again)")

    async def _serve_active(self, stop: asyncio.Event, lease: Lease) -> None:
        metrics.start()
        metrics.observe(
            reconnects=lambda: self.bus.reconnects,
            dead_letters=lambda: dict(self.bus.dead_letters),
            offences=self.reputations.offences,
        )
        await self._recover()
        await self.reputations.load_all(self.bus)
        self.reputations.start()

        async def loop() -> None:
            # each fetch grouped by job: one job's messages are read, saved and decided together
            slots = asyncio.Semaphore(IN_FLIGHT)
            async for msgs in self.bus.consume_batches(
                subjects.VERIFY_ALL, subjects.VERIFIER_CONSUMER, batch=IN_FLIGHT
            ):
                if not await lease.ensure():  # frozen or cut off: another may be active
                    return
                groups: dict[str, list[Msg]] = {}
                for msg in msgs:  # (a subject that names no job is dropped by _check)
                    groups.setdefault(_job_of(msg.subject), []).append(msg)
                for job_id, group in groups.items():
                    await slots.acquire()
                    self._spawn(self._handle_and_ack(job_id, group, slots), "results")

        async def sweep() -> None:
            while True:
                await self._sweep()
                await asyncio.sleep(SWEEP_EVERY)

        tasks = [asyncio.create_task(loop()), asyncio.create_task(sweep())]
        await self.bus.nc.flush()
        self.log.info("service.ready", service="verifier", instance=lease.holder.instance)
        sdnotify.ready()
        ends = [asyncio.create_task(stop.wait()), asyncio.create_task(lease.lost.wait())]
        try:
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for end in ends:
                end.cancel()
            await stop_tasks([*tasks, *self._tasks])  # (bounded: see bacq.terms)
            await self.reputations.stop(timeout=STOP_STEP)
            self.log.info("service.stopped", service="verifier")
