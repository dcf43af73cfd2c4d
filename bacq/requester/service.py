"""The requester: takes submissions, runs the bidding, assigns workers, records every state change.

Touches NATS only. It is the single writer of the ``bacq-jobs`` bucket and of the ``BACQ_EVENTS``
stream: every change of a job record is first published as hash-chained events (``bacq.events``),
then saved, so a job's history is complete even if the process dies between the two (on start it
rolls records forward from their events). It answers submissions (idempotently, by key) and
cancellations, announces jobs, collects bids, assigns ``concurrency`` workers (rejecting the others
so they free their capacity), folds worker progress and the verifier's verdict into the record, and
keeps every non-final state on a deadline: no bids, a worker that stops heartbeating (its execution
is lost and moved to another worker, up to the spec's ``retries``), no result, no verdict.
On start it picks up every unfinished job and drives it to an end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from bacq import sdnotify, subjects
from bacq.bus import Bus, ensure_bucket
from bacq.errors import SpecError
from bacq.events import Event, decode_events, diff, fold, seal
from bacq.log import get_logger
from bacq.logs import ensure_logs_stream
from bacq.models import (
    Announcement,
    Assignment,
    AssignmentReply,
    Bid,
    CancelReply,
    CancelRequest,
    ExecUpdate,
    Execution,
    JobRecord,
    NodeInfo,
    Problem,
    SubmitReply,
    SubmitRequest,
    Verdict,
    decode,
    encode,
    new_job_id,
    now,
)
from bacq.nodes import nodes_bucket
from bacq.requester.record import apply_exec_update, apply_verdict, move_exec, move_job
from bacq.spec import JobSpec, Resources, parse_spec
from bacq.states import EXEC_ACTIVE, ExecState, JobState

__all__ = ["Requester", "RequesterConfig"]

ASSIGN_TIMEOUT = 5.0  # seconds a chosen worker has to confirm an assignment
REANNOUNCE_EVERY = 2.0  # seconds between announcements while bids are missing
WATCH_EVERY = 1.0  # seconds between deadline checks
FOLD_IN_FLIGHT = 256  # progress messages and verdicts being folded at once
QUICK_BIDS = 0.05  # seconds within which bids count as quick (see drive)
LISTEN_FIRST = 2.5  # seconds to hear worker heartbeats after a start before queued jobs go out


@dataclass(frozen=True, kw_only=True)
class RequesterConfig:
    result_grace: float = 120.0  # beyond the job's timeout: inputs, image, publishing
    lost_after: float = 10.0  # seconds without a heartbeat before a worker is lost
    verify_timeout: float = 60.0  # seconds from the last answer to the verdict
    events_max_age: float = 365 * 24 * 3600.0
    events_max_bytes: int = 10 * 1024**3


# one change of a job record (True when it changed it), and who caused it
Step = tuple[Callable[[JobRecord], bool], str]


@dataclass
class _Load:
    """What the requester has put on one worker: executions ("run", job) and invitations to bid
    ("bid", job), with their cpu and memory summed as they come and go."""

    held: dict[tuple[str, str], Resources] = field(default_factory=dict)
    cpu: float = 0.0
    memory: int = 0

    def add(self, key: tuple[str, str], resources: Resources) -> None:
        if key not in self.held:
            self.held[key] = resources
            self.cpu += resources.cpu
            self.memory += resources.memory

    def remove(self, key: tuple[str, str]) -> None:
        resources = self.held.pop(key, None)
        if resources is not None:
            self.cpu -= resources.cpu
            self.memory -= resources.memory


def _record_bids(job: JobRecord, *, bids: list[Bid]) -> bool:
    if job.final:  # ended (cancelled) while bidding
        return False
    changed = False
    for bid in bids:
        changed |= move_exec(job, bid.node_id, ExecState.BID, detail="bid")
    return changed


def _selected(node: NodeInfo, spec: JobSpec) -> bool:
    """True when ``node`` has every label the job's node_selector asks for."""
    return all(node.labels.get(k) == v for k, v in spec.node_selector.items())


def _copy(job: JobRecord) -> JobRecord:
    """A copy the record functions may change: its own executions, the rest shared (a change
    replaces scalar fields and executions; the spec is never changed). Far cheaper than a deep
    copy, which was a tenth of the requester's time."""
    return job.model_copy(
        update={"executions": {k: e.model_copy() for k, e in job.executions.items()}}
    )


def _idempotency_slot(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:40]


class Requester:
    def __init__(self, bus: Bus, config: RequesterConfig | None = None) -> None:
        self.bus = bus
        self.config = config or RequesterConfig()
        self.log = get_logger("bacq.requester")
        self._locks: dict[str, asyncio.Lock] = {}
        self._bids: dict[str, list[Bid]] = {}
        self._bid_arrived: dict[str, asyncio.Event] = {}
        self._excluded: dict[str, set[str]] = {}  # job → nodes whose bids are refused at once
        self._tasks: set[asyncio.Task[None]] = set()
        self._nodes: dict[str, tuple[NodeInfo, float]] = {}  # node → (info, monotonic seen)
        self._started = time.monotonic()
        self._retrying: set[tuple[str, str]] = set()
        self._idempotency: Any = None
        # the single writer's copy of every unfinished job (watched for deadlines and lost
        # workers); records are changed only through ``mutate``, on a copy, committed first
        self._records: dict[str, JobRecord] = {}
        self._queue: deque[str] = deque()  # pending jobs waiting for free worker slots, FIFO
        self._wake = asyncio.Event()  # the dispatcher looks at the queue again
        self._bidding: dict[str, list[str]] = {}  # job in bidding → the workers it invited
        self._loads: dict[str, _Load] = {}  # node → what it runs and was invited to bid for

    # -- records and events -----------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _commit(self, job: JobRecord, events: list[Event], prev_hash: str) -> None:
        """Chain ``events`` after ``prev_hash`` and publish them, then save ``job``."""
        if events:
            seal(events, prev_hash)
            job.event_seq, job.last_hash = events[-1].seq, events[-1].hash
            await self.bus.publish_events(events)
        await self.bus.save_job(job)

    async def _load(self, job_id: str) -> JobRecord | None:
        job = self._records.get(job_id)
        return job if job is not None else await self.bus.load_job(job_id)

    def _keep(self, job: JobRecord) -> None:
        """Remember ``job`` as committed: the cache, and which nodes it keeps busy."""
        for node_id, execution in job.executions.items():
            load = self._loads.setdefault(node_id, _Load())
            if execution.state in EXEC_ACTIVE and not job.final:
                load.add(("run", job.id), job.spec.resources)
            else:
                load.remove(("run", job.id))
        if job.final:
            self._records.pop(job.id, None)
            self._locks.pop(job.id, None)
        else:
            self._records[job.id] = job
        if self._queue:
            self._wake.set()  # a slot may have freed

    async def mutate(
        self, job_id: str, change: Callable[[JobRecord], bool], *, actor: str = "requester"
    ) -> JobRecord | None:
        """Change one job record under its lock and commit it; returns the record."""
        return await self.mutate_steps(job_id, [(change, actor)])

    async def mutate_steps(self, job_id: str, steps: Sequence[Step]) -> JobRecord | None:
        """Apply several changes (each with its actor) to one job record and commit them at once:
        one event per change as if committed one by one, one round trip for the events and one
        for the record. The changes work on a copy; the cache holds committed records only."""
        lock = self._locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            current = await self._load(job_id)
            if current is None:
                return None
            job = _copy(current)
            events: list[Event] = []
            changed = False
            for change, actor in steps:
                before = _copy(job)
                if change(job):
                    changed = True
                    job.updated_at = now()
                    step = diff(before, job, actor=actor)
                    job.event_seq += len(step)
                    events += step
            if not changed:
                self._keep(current)
                return job
            job.event_seq = current.event_seq
            await self._commit(job, events, current.last_hash)
            self._keep(job)
            return job

    async def _reconcile(self, job: JobRecord) -> JobRecord:
        """Roll a record forward from its events if the process died between the two."""
        try:
            last = await self.bus.js.get_last_msg(subjects.EVENTS_STREAM, subjects.events(job.id))
        except nats.js.errors.NotFoundError:
            return job
        if decode_events(last.data or b"{}")[-1].seq <= job.event_seq:
            return job
        rebuilt = fold(await self.bus.job_events(job.id))
        rebuilt.deadline, rebuilt.idempotency_key = job.deadline, job.idempotency_key
        await self.bus.save_job(rebuilt)
        self.log.info("job.rolled_forward", job=job.id, seq=rebuilt.event_seq)
        return rebuilt

    # -- submission and cancellation --------------------------------------------------------------
    async def on_submit(self, msg: Msg) -> None:
        # a subscription's callback runs one message at a time: take submissions concurrently
        self._spawn(self._submit(msg), "submit")

    async def _submit(self, msg: Msg) -> None:
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
        job = JobRecord(id=new_job_id(), spec=spec, idempotency_key=request.idempotency_key)
        if request.idempotency_key:
            existing = await self._claim_key(request.idempotency_key, job.id)
            if existing is not None:
                self.log.info("job.duplicate_submission", job=existing)
                await msg.respond(encode(SubmitReply(job_id=existing)))
                return
        await self._commit(job, diff(None, job, actor="client"), job.last_hash)
        self._keep(job)
        self.log.info("job.submitted", job=job.id, image=spec.image)
        await msg.respond(encode(SubmitReply(job_id=job.id)))
        self._enqueue(job.id)

    async def _claim_key(self, key: str, job_id: str) -> str | None:
        """Bind ``key`` to ``job_id``; if a job already holds it, return that job's id instead."""
        slot = _idempotency_slot(key)
        try:
            await self._idempotency.create(slot, job_id.encode())
            return None
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await self._idempotency.get(slot)
            existing = (entry.value or b"").decode()
        if await self.bus.load_job(existing) is None:
            # the first attempt died between claiming the key and saving: finish it from events
            events = await self.bus.job_events(existing)
            if not events:
                await self._idempotency.put(slot, job_id.encode())
                return None
            job = fold(events)
            job.idempotency_key = key
            await self.bus.save_job(job)
            self._keep(job)
            self._enqueue(existing)
        return existing

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

    # -- workers ----------------------------------------------------------------------------------
    async def on_heartbeat(self, msg: Msg) -> None:
        try:
            info = decode(NodeInfo, msg.data)
        except ValueError:
            return
        self._nodes[info.node_id] = (info, time.monotonic())

    def _live_nodes(self) -> list[NodeInfo]:
        horizon = time.monotonic() - self.config.lost_after
        return [
            info for info, seen in self._nodes.values() if seen >= horizon and not info.draining
        ]

    def _last_seen(self, node_id: str) -> float:
        seen = self._nodes.get(node_id, (None, 0.0))[1]
        # after a start or a NATS outage nobody could be heard: count from then
        return max(seen, self._started, self.bus.reconnected_at)

    def _why_no_bids(self, spec: JobSpec, got: int, need: int, what: str) -> str:
        live = self._live_nodes()
        fitting = [n for n in live if _selected(n, spec)]
        parts = [f"{what}: {got} of the {need} needed bid within {spec.bid_timeout:g}s"]
        if spec.node_selector:
            labels = ",".join(f"{k}={v}" for k, v in spec.node_selector.items())
            parts.append(f"{len(fitting)} of {len(live)} live workers have the label {labels}")
        else:
            parts.append(f"{len(live)} live worker(s)")
        if spec.min_bids > spec.concurrency:
            parts.append(f"min_bids {spec.min_bids}")
        return "; ".join(parts)

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
        if bid.node_id in self._excluded.get(bid.job_id, ()):  # it ran the job already: free it
            self._spawn(self._reject(bid.job_id, bid.node_id, "already ran this job"), "reject")
            return
        bids.append(bid)
        self._bid_arrived[bid.job_id].set()

    async def _reject(self, job_id: str, node_id: str, reason: str) -> None:
        """Tell a bidder it was not chosen, so it frees what its bid reserved. No answer is
        awaited: a worker that misses it lets the reservation expire on its own."""
        with contextlib.suppress(nats.errors.Error):
            await self.bus.publish(
                subjects.assign(node_id), Assignment(job_id=job_id, accepted=False, reason=reason)
            )

    async def _collect_bids(
        self, job: JobRecord, need: int, exclude: set[str], *, invited: list[str] | None = None
    ) -> list[Bid]:
        """Announce ``job`` until ``need`` bids from nodes outside ``exclude`` came, or time out.

        The first announcement goes to the ``invited`` workers only (when given); the next ones,
        if bids are missing, to every worker."""
        spec = job.spec
        self._bids[job.id] = []
        self._excluded[job.id] = exclude
        arrived = self._bid_arrived[job.id] = asyncio.Event()
        try:
            deadline = now() + timedelta(seconds=spec.bid_timeout)
            announcement = Announcement(
                job_id=job.id, spec=spec, bid_deadline=deadline, nodes=invited
            )
            loop = asyncio.get_running_loop()
            end = loop.time() + spec.bid_timeout

            # bids from ``exclude`` are refused as they come (on_bid): every collected one counts
            while len(self._bids[job.id]) < need and loop.time() < end:
                with contextlib.suppress(nats.errors.Error):
                    if announcement.nodes is None:
                        await self.bus.publish(subjects.ANNOUNCE, announcement)
                    else:  # only the invited workers hear of it (no fan-out to every worker)
                        for node in announcement.nodes:
                            await self.bus.publish(subjects.invite(node), announcement)
                announcement.nodes = None
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        arrived.wait(), timeout=min(REANNOUNCE_EVERY, max(0.0, end - loop.time()))
                    )
        finally:
            bids = self._bids.pop(job.id, [])
            self._excluded.pop(job.id, None)
            self._bid_arrived.pop(job.id, None)
        return bids

    # -- the queue --------------------------------------------------------------------------------
    def _enqueue(self, job_id: str, *, first: bool = False) -> None:
        (self._queue.appendleft if first else self._queue.append)(job_id)
        self._wake.set()

    def _fitting(self, spec: JobSpec) -> list[NodeInfo]:
        """Live workers that could run ``spec`` once they have a free slot."""
        return [
            n
            for n in self._live_nodes()
            if _selected(n, spec)
            and spec.resources.cpu <= n.cpu + 1e-9
            and spec.resources.memory <= n.memory
            and (n.network or not spec.network)
        ]

    def _fits_now(self, node: NodeInfo, spec: JobSpec) -> int:
        """Free slots of ``node`` for ``spec`` (0 when it lacks the cpu or memory now), counting
        what its running executions and the bids it was invited to hold."""
        load = self._loads.get(node.node_id) or _Load()
        if (
            spec.resources.cpu > node.cpu - load.cpu + 1e-9
            or spec.resources.memory > node.memory - load.memory
        ):
            return 0
        return max(0, node.max_jobs - len(load.held))

    def _pick(self, fitting: list[NodeInfo], spec: JobSpec, need: int) -> list[str] | None:
        """The ``need`` fitting workers with the most free slots, or None when too few have one."""
        # random among equals: spreads the load (not a security matter)
        free = [(self._fits_now(n, spec), random.random(), n.node_id) for n in fitting]  # noqa: S311
        ready = sorted((f for f in free if f[0] > 0), reverse=True)
        return [node for _, _, node in ready[:need]] if len(ready) >= need else None

    def _hold(self, job: JobRecord, nodes: list[str]) -> None:
        self._bidding[job.id] = nodes
        for node in nodes:
            self._loads.setdefault(node, _Load()).add(("bid", job.id), job.spec.resources)

    def _release(self, job_id: str) -> None:
        for node in self._bidding.pop(job_id, []):
            self._loads[node].remove(("bid", job_id))
        self._wake.set()

    async def _dispatch(self) -> None:
        """Start bidding for queued jobs, oldest first, while workers have free slots.

        The requester counts each live worker's slots (``max_jobs`` from its heartbeat) against
        the executions it assigned there and the bids it invited, and invites the workers with
        the most free slots. A job waits in ``pending`` while every worker that could run it is
        busy (up to its ``queue_timeout``); a job that no set of live workers could ever run is
        announced to all at once and fails for want of bids, with the reason."""
        await asyncio.sleep(LISTEN_FIRST)  # hear the workers' heartbeats before counting slots
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                job = self._records.get(self._queue[0])
                if job is None or job.state not in (JobState.PENDING, JobState.BIDDING):
                    self._queue.popleft()  # ended (cancelled, failed) while it waited
                    continue
                need = max(job.spec.concurrency, job.spec.min_bids)
                fitting = self._fitting(job.spec)
                invited: list[str] | None = None
                if len(fitting) >= need:
                    invited = self._pick(fitting, job.spec, need)
                    if invited is None:
                        break  # busy: wait for a slot (a job ending, a heartbeat, the watchdog)
                self._queue.popleft()
                self._hold(job, invited or [])
                self._spawn(self.drive(job.id, invited), f"drive-{job.id}")

    async def drive(self, job_id: str, invited: list[str] | None = None) -> None:
        """Take a job from pending (or bidding) to running; back to the queue when busy."""
        try:
            job = await self._load(job_id)
            if job is None or job.final or job.state not in (JobState.PENDING, JobState.BIDDING):
                return
            spec = job.spec
            need = max(spec.concurrency, spec.min_bids)

            def bidding(j: JobRecord) -> bool:
                return move_job(j, JobState.BIDDING, f"waiting for {need} bid(s)")

            # bids from invited workers come within milliseconds: then "bidding" is committed
            # with the bids and the choice, in one commit; if they are slow, on its own first
            collect = asyncio.create_task(
                self._collect_bids(job, need, exclude=set(), invited=invited)
            )
            try:
                done, _ = await asyncio.wait({collect}, timeout=QUICK_BIDS)
                first: list[Step] = []
                if done:
                    first = [(bidding, "requester")]
                else:
                    await self.mutate(job_id, bidding)
                bids = await collect
            finally:
                collect.cancel()
            could_run = len(self._fitting(spec)) >= need  # once the busy ones have room
            if bids and len(bids) < need and could_run:
                # workers that could run it are busy: free the bidders, wait in the queue
                await asyncio.gather(*(self._reject(job_id, b.node_id, "busy") for b in bids))
                bids = []
            if not bids and could_run:
                requeued = await self.mutate(
                    job_id,
                    lambda j: move_job(
                        j, JobState.PENDING, "queued: every worker that could run it is busy"
                    ),
                )
                if requeued is not None and not requeued.final:
                    self._enqueue(job_id, first=True)
                return

            if len(bids) < need:
                await self._not_enough_bids(
                    job_id,
                    bids,
                    self._why_no_bids(spec, len(bids), need, "not enough bids"),
                    first=first,
                )
                return
            await self._assign(
                job_id, bids[: spec.concurrency], bids[spec.concurrency :], first=first
            )
        except Exception:
            self.log.exception("job.drive_crashed", job=job_id)
            await self.mutate(
                job_id, lambda j: move_job(j, JobState.FAILED, "internal requester error")
            )
        finally:
            self._release(job_id)

    async def _not_enough_bids(
        self,
        job_id: str,
        bids: list[Bid],
        reason: str,
        *,
        first: Sequence[Step] = (),
    ) -> None:
        await asyncio.gather(*(self._reject(job_id, b.node_id, reason) for b in bids))

        def fail(j: JobRecord) -> bool:
            for bid in bids:
                move_exec(j, bid.node_id, ExecState.BID_REJECTED, detail="job failed")
            return move_job(j, JobState.FAILED, reason)

        self.log.info("job.no_bids", job=job_id, reason=reason)
        await self.mutate_steps(
            job_id, [*first, (partial(_record_bids, bids=bids), "requester"), (fail, "requester")]
        )

    def _results_deadline(self, spec: JobSpec) -> dt.datetime:
        return now() + timedelta(seconds=spec.timeout + self.config.result_grace)

    async def _assign(
        self, job_id: str, chosen: list[Bid], others: list[Bid], *, first: Sequence[Step] = ()
    ) -> None:
        def choose(j: JobRecord) -> bool:
            if j.final:
                return False
            for bid in chosen:
                move_exec(j, bid.node_id, ExecState.ACCEPTED, detail="bid accepted")
            for bid in others:
                move_exec(j, bid.node_id, ExecState.BID_REJECTED, detail="other workers chosen")
            j.deadline = self._results_deadline(j.spec)
            move_job(
                j, JobState.RUNNING, f"running on {len(j.executions_in(*EXEC_ACTIVE))} worker(s)"
            )
            return True

        # the bids and the choice, recorded before the workers hear of it, so that no result
        # can arrive for an unknown node
        job = await self.mutate_steps(
            job_id,
            [
                *first,
                (partial(_record_bids, bids=chosen + others), "requester"),
                (choose, "requester"),
            ],
        )
        if job is None or job.final:
            await asyncio.gather(
                *(self._reject(job_id, b.node_id, "job ended") for b in chosen + others)
            )
            return
        await asyncio.gather(
            *(self._reject(job_id, b.node_id, "other workers chosen") for b in others),
            *(self._send_assignment(job, b.node_id) for b in chosen),
        )

    async def _send_assignment(self, job: JobRecord, node_id: str) -> None:
        error: str | None
        try:
            reply = await self.bus.request(
                subjects.assign(node_id),
                Assignment(job_id=job.id, accepted=True, spec=job.spec),
                AssignmentReply,
                timeout=ASSIGN_TIMEOUT,
            )
            error = None if reply.ok else f"worker {node_id} declined the assignment: {reply.error}"
        except (nats.errors.Error, TimeoutError) as exc:
            error = f"worker {node_id} did not confirm the assignment ({type(exc).__name__})"
        if error is not None:
            self.log.warning("assign.failed", job=job.id, node=node_id, error=error)
            await self._lose(job.id, node_id, error)

    # -- lost workers and retries -----------------------------------------------------------------
    async def _lose(self, job_id: str, node_id: str, reason: str) -> None:
        """Mark ``node_id``'s execution lost and move the work to another worker (or fail)."""
        if (job_id, node_id) in self._retrying:
            return
        self._retrying.add((job_id, node_id))
        try:

            def lose(j: JobRecord) -> bool:
                return move_exec(j, node_id, ExecState.LOST, error=reason)

            job = await self.mutate(job_id, lose)
            if job is None or job.final or job.executions[node_id].state != ExecState.LOST:
                return
            spec = job.spec
            if job.retries_used > spec.retries:
                await self.mutate(
                    job_id,
                    lambda j: move_job(
                        j, JobState.FAILED, f"{reason}; no retries left (retries {spec.retries})"
                    ),
                )
                return
            # every worker that already holds an execution of this job stays out of the retry
            exclude = {n for n, e in job.executions.items() if e.state != ExecState.BID_REJECTED}
            bids = await self._collect_bids(job, 1, exclude)
            if not bids:
                why = self._why_no_bids(spec, 0, 1, "no worker took over")
                await self.mutate(
                    job_id, lambda j: move_job(j, JobState.FAILED, f"{reason}; {why}")
                )
                return
            self.log.info("job.retry", job=job_id, lost=node_id, to=bids[0].node_id)
            await self._assign(job_id, bids[:1], bids[1:])
        finally:
            self._retrying.discard((job_id, node_id))

    async def _watch(self) -> None:
        """Every second: find lost workers and passed deadlines among unfinished jobs."""
        while True:
            await asyncio.sleep(WATCH_EVERY)
            try:
                await self._check_all()
            except (nats.errors.Error, TimeoutError) as exc:
                self.log.warning("watch.failed", error=type(exc).__name__)

    async def _check_all(self) -> None:
        t, current = time.monotonic(), now()
        self._wake.set()  # heartbeats may have brought workers (or slots) to the queue
        for job in list(self._records.values()):
            if job.state == JobState.PENDING:
                waited = (current - job.created_at).total_seconds()
                if waited > job.spec.queue_timeout:
                    fitting = len(self._fitting(job.spec))
                    reason = (
                        f"waited {waited:.0f}s in the queue (queue_timeout "
                        f"{job.spec.queue_timeout:g}s); {fitting} live worker(s) could run it, "
                        "all busy"
                    )
                    await self.mutate(
                        job.id, partial(move_job, target=JobState.FAILED, reason=reason)
                    )
                continue
            if job.state not in (JobState.RUNNING, JobState.VERIFYING):
                continue
            for execution in job.executions_in(*EXEC_ACTIVE):
                node = execution.node_id
                silent = t - self._last_seen(node)
                info = self._nodes.get(node, (None, 0.0))[0]
                age = (now() - execution.updated_at).total_seconds()
                if silent > self.config.lost_after:
                    why = (
                        f"worker {node} stopped sending heartbeats during "
                        f"{execution.state.value} ({silent:.0f}s silent)"
                    )
                elif info is not None and self._forgot(info, job.id, execution, age):
                    why = f"worker {node} restarted and no longer runs the job"
                else:
                    continue
                self.log.warning("exec.lost", job=job.id, node=node, reason=why)
                self._spawn(self._lose(job.id, node, why), f"lose-{job.id}-{node}")
            if job.deadline is not None and now() > job.deadline:
                await self.mutate(job.id, self._expire)
            elif job.state == JobState.VERIFYING:
                waited = (now() - job.updated_at).total_seconds()
                if waited > self.config.verify_timeout:
                    await self.mutate(
                        job.id,
                        lambda j: move_job(
                            j,
                            JobState.FAILED,
                            f"the verifier gave no verdict within {self.config.verify_timeout:g}s "
                            "of the last answer (is a verifier running?)",
                        ),
                    )

    def _forgot(self, info: NodeInfo, job_id: str, execution: Execution, age: float) -> bool:
        """True when the worker's process started after it was given ``execution`` and does not
        run the job: the job died with the previous process. (A job it merely finished is not
        listed either, while its report waits in the stream for this requester to fold it: under
        load that can take longer than ``lost_after``, so age alone would lose finished jobs.)"""
        if job_id in info.jobs:
            return False
        if info.started_at is None or execution.assigned_at is None:  # unknown: by age
            return age > self.config.lost_after
        return info.started_at > execution.assigned_at

    def _expire(self, job: JobRecord) -> bool:
        silent = [e.node_id for e in job.executions.values() if e.state in EXEC_ACTIVE]
        if silent:
            reason = (
                f"no result from {', '.join(sorted(silent))} within the job's timeout "
                f"({job.spec.timeout:g}s) + {self.config.result_grace:g}s grace"
            )
            for node_id in silent:
                move_exec(job, node_id, ExecState.FAILED, error="no result before the deadline")
        else:
            reason = "no verdict before the deadline (is a verifier running?)"
        return move_job(job, JobState.FAILED, reason)

    # -- progress and verdicts --------------------------------------------------------------------
    async def _fold(self) -> None:
        """Fold progress messages and verdicts into the records, many at once.

        The messages of one fetch are grouped by job: each job's group is one commit (its
        events as if applied one by one), in a task of its own. Tasks take their job's lock in
        the order their messages came, so one job's updates apply in order."""
        slots = asyncio.Semaphore(FOLD_IN_FLIGHT)
        async for msgs in self.bus.consume_batches(
            [subjects.EXEC_ALL, subjects.VERDICT_ALL],
            subjects.REQUESTER_CONSUMER,
            batch=FOLD_IN_FLIGHT,
        ):
            groups: dict[str, list[tuple[Msg, Step]]] = {}
            for msg in msgs:
                folded = self._step(msg)
                if folded is None:
                    await msg.ack()
                    continue
                job_id, step = folded
                groups.setdefault(job_id, []).append((msg, step))
            for job_id, group in groups.items():
                await slots.acquire()
                self._spawn(self._fold_group(job_id, group, slots), "fold")

    def _step(self, msg: Msg) -> tuple[str, Step] | None:
        """The change ``msg`` makes to its job record (None: nothing to fold)."""
        try:
            if msg.subject.startswith(subjects.EXEC_ALL[:-1]):
                update = decode(ExecUpdate, msg.data)
                if update.state == ExecState.LOST:  # handed back by a draining worker
                    reason = update.error or f"worker {update.node_id} handed the job back"
                    self._spawn(self._lose(update.job_id, update.node_id, reason), "handback")
                    return None
                return update.job_id, (partial(apply_exec_update, update=update), update.node_id)
            verdict = decode(Verdict, msg.data)
            self.log.info(
                "job.verdict", job=verdict.job_id, outcome=verdict.outcome, reason=verdict.reason
            )
            return verdict.job_id, (partial(apply_verdict, verdict=verdict), "verifier")
        except ValueError as exc:
            self.log.warning("message.malformed", subject=msg.subject, error=str(exc))
            return None

    async def _fold_group(
        self,
        job_id: str,
        group: list[tuple[Msg, Step]],
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            await self.mutate_steps(job_id, [step for _, step in group])
            for msg, _ in group:
                await msg.ack()
        except (nats.errors.Error, TimeoutError) as exc:
            # not acked: JetStream delivers them again after the consumer's ack_wait
            self.log.warning("fold.failed", job=job_id, error=type(exc).__name__)
        finally:
            slots.release()

    async def _resume(self) -> None:
        queued: list[JobRecord] = []
        for job_id in await self.bus.job_ids():
            job = await self.bus.load_job(job_id)
            if job is None or job.final:
                continue
            job = await self._reconcile(job)
            self.log.info("job.resumed", job=job_id, state=job.state)
            if job.state in (JobState.PENDING, JobState.BIDDING):
                queued.append(job)
            elif job.deadline is None:
                job.deadline = self._results_deadline(job.spec)
                await self.bus.save_job(job)
            self._keep(job)
        for job in sorted(queued, key=lambda j: j.created_at):
            self._enqueue(job.id)

    async def serve(self, stop: asyncio.Event) -> None:
        await self.bus.set_events_retention(
            max_age=self.config.events_max_age, max_bytes=self.config.events_max_bytes
        )
        self._idempotency = await ensure_bucket(self.bus.js, subjects.IDEMPOTENCY_BUCKET)
        # declared here for the workers, which may not use the JetStream API themselves
        await ensure_logs_stream(self.bus.js)
        await nodes_bucket(self.bus)
        subs = [
            await self.bus.subscribe(subjects.SUBMIT, self.on_submit, queue="requester"),
            await self.bus.subscribe(subjects.CANCEL, self.on_cancel, queue="requester"),
            await self.bus.subscribe(subjects.HEARTBEAT, self.on_heartbeat),
            await self.bus.subscribe(subjects.BIDS_ALL, self.on_bid),
        ]
        await self._resume()
        loops = [
            asyncio.create_task(self._fold()),
            asyncio.create_task(self._watch()),
            asyncio.create_task(self._dispatch()),
        ]
        await self.bus.nc.flush()
        self.log.info("service.ready", service="requester")
        sdnotify.ready()
        try:
            await stop.wait()
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            for task in [*loops, *self._tasks]:
                task.cancel()
            await asyncio.gather(*loops, *self._tasks, return_exceptions=True)
            self.log.info("service.stopped", service="requester")
