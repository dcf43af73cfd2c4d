"""Capacity and dispatch: what workers offer, the queue, bidding and assignment. Touches NATS.

The requester counts each live worker's slots against what it assigned and invited, invites the
freest workers to bid, collects bids, assigns ``concurrency`` workers and rejects the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import partial

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from bacq import metrics, subjects
from bacq.errors import Fenced
from bacq.faults import crash_point
from bacq.models import (
    Announcement,
    Assignment,
    AssignmentReply,
    Bid,
    JobRecord,
    NodeInfo,
    decode,
    now,
)
from bacq.requester._base import (
    ASSIGN_TIMEOUT,
    LISTEN_FIRST,
    MAX_NODE_MESSAGE,
    QUICK_BIDS,
    REANNOUNCE_EVERY,
    Load,
    M,
    Step,
    record_bids,
    selected,
)
from bacq.requester.ledger import Ledger
from bacq.requester.record import move_exec, move_job
from bacq.spec import JobSpec
from bacq.states import EXEC_ACTIVE, ExecState, JobState


class Dispatch(Ledger):
    # -- workers ----------------------------------------------------------------------------------
    async def on_heartbeat(self, msg: Msg) -> None:
        try:
            node_id = subjects.node_of(msg.subject)
        except ValueError:
            return
        info = self._checked(msg, node_id, NodeInfo)
        if info is None:
            return
        if info.node_id != node_id:
            self._offence(node_id, "forged", f"a heartbeat that speaks for {info.node_id[:80]!r}")
            return
        # believe no more capacity than the operator config allows this node
        self._nodes[node_id] = (self.operators.capped(info), time.monotonic())

    def _checked(self, msg: Msg, node_id: str, model: type[M]) -> M | None:
        """``msg``'s payload as ``model``, or None (counted against ``node_id``)."""
        if len(msg.data) > MAX_NODE_MESSAGE:
            self._offence(node_id, "malformed", f"{len(msg.data)} bytes on {msg.subject}")
            return None
        try:
            return decode(model, msg.data)
        except ValueError as exc:
            self._offence(node_id, "malformed", f"on {msg.subject}: {str(exc)[:200]}")
            return None

    def _offence(self, node_id: str, kind: str, what: str) -> None:
        self.reputations.count(node_id, kind)
        self.log.warning("message.dropped", node=node_id, kind=kind, what=what)

    def _live_nodes(self) -> list[NodeInfo]:
        horizon = time.monotonic() - self.config.lost_after
        return [
            info
            for info, seen in self._nodes.values()
            if seen >= horizon
            and not info.draining
            and self.reputations.quarantined(info.node_id) is None
        ]

    def _last_seen(self, node_id: str) -> float:
        seen = self._nodes.get(node_id, (None, 0.0))[1]
        # after a start or a NATS outage nobody could be heard: count from then
        return max(seen, self._started, self.bus.reconnected_at)

    def _why_no_bids(self, spec: JobSpec, got: int, need: int, what: str) -> str:
        live = self._live_nodes()
        fitting = [n for n in live if selected(n, spec)]
        parts = [f"{what}: {got} of the {need} needed bid within {spec.bid_timeout:g}s"]
        if spec.node_selector:
            labels = ",".join(f"{k}={v}" for k, v in spec.node_selector.items())
            parts.append(f"{len(fitting)} of {len(live)} live workers have the label {labels}")
        else:
            parts.append(f"{len(live)} live worker(s)")
        operators = len({self.operators.operator(n.node_id) for n in fitting})
        if operators < len(fitting):
            parts.append(f"of {operators} distinct operator(s)")
        if spec.min_bids > spec.concurrency:
            parts.append(f"min_bids {spec.min_bids}")
        return "; ".join(parts)

    # -- bidding ----------------------------------------------------------------------------------
    async def on_bid(self, msg: Msg) -> None:
        try:
            job_id, node_id = subjects.job_and_node(msg.subject)
        except ValueError:
            return
        bid = self._checked(msg, node_id, Bid)
        if bid is None:
            return
        if bid.node_id != node_id or bid.job_id != job_id:
            self._offence(
                node_id,
                "forged",
                f"a bid on {msg.subject} for {bid.job_id[:80]!r}/{bid.node_id[:80]!r}",
            )
            return
        bids = self._bids.get(job_id)
        if bids is None:  # bidding is over for this job: free the worker at once
            self._spawn(self._reject(job_id, node_id, "bidding closed"), "late-bid")
            return
        if any(b.node_id == node_id for b in bids):
            return
        why = self._refuse_bid(job_id, node_id, bids)
        if why is not None:
            metrics.BIDS.labels("refused").inc()
            self._spawn(self._reject(job_id, node_id, why), "reject")
            return
        metrics.BIDS.labels("collected").inc()
        bids.append(bid)
        self._bid_arrived[job_id].set()

    def _refuse_bid(self, job_id: str, node_id: str, bids: list[Bid]) -> str | None:
        """Why a bid is refused: only invited, live, unquarantined nodes bid, and at most one
        node of each operator for a job (none of an operator that already ran it)."""
        if node_id not in self._invited.get(job_id, ()):
            return "not invited to bid"
        info = self._nodes.get(node_id)
        if info is None or info[1] < time.monotonic() - self.config.lost_after:
            return "no recent heartbeat"
        if self.reputations.quarantined(node_id) is not None:
            return "quarantined"
        operator = self.operators.operator(node_id)
        if operator in self._excluded.get(job_id, ()):
            return "this job ran on this operator's nodes already"
        if any(self.operators.operator(b.node_id) == operator for b in bids):
            return f"another node of operator {operator} bid already"
        return None

    async def _reject(self, job_id: str, node_id: str, reason: str) -> None:
        """Tell a bidder it was not chosen, so it frees what its bid reserved. No answer is
        awaited: a worker that misses it lets the reservation expire on its own."""
        with contextlib.suppress(nats.errors.Error, ValueError):
            await self.bus.publish(
                subjects.assign(node_id), Assignment(job_id=job_id, accepted=False, reason=reason)
            )

    async def _collect_bids(
        self, job: JobRecord, need: int, exclude: set[str], *, invited: list[str] | None = None
    ) -> list[Bid]:
        """Invite workers to bid for ``job`` until ``need`` bids came, or time out.

        The first invitations go to the ``invited`` workers (when given); the next ones, if bids
        are missing, to every live worker that could run the job. Nodes in ``exclude`` (and
        every node of their operators) are never invited."""
        spec = job.spec
        excluded_ops = {self.operators.operator(n) for n in exclude}
        self._bids[job.id] = []
        self._excluded[job.id] = excluded_ops
        self._invited[job.id] = set()
        arrived = self._bid_arrived[job.id] = asyncio.Event()
        try:
            deadline = now() + timedelta(seconds=spec.bid_timeout)
            announcement = Announcement(job_id=job.id, spec=spec, bid_deadline=deadline)
            loop = asyncio.get_running_loop()
            end = loop.time() + spec.bid_timeout
            nodes = invited
            # refused bids never enter the list (on_bid): every collected one counts
            while len(self._bids[job.id]) < need and loop.time() < end:
                if nodes is None:
                    nodes = [
                        n.node_id
                        for n in self._fitting(spec)
                        if self.operators.operator(n.node_id) not in excluded_ops
                    ]
                bidders = {b.node_id for b in self._bids[job.id]}
                self._invited[job.id].update(nodes)
                with contextlib.suppress(nats.errors.Error):
                    for node in nodes:  # only invited workers hear of a job
                        if node not in bidders:
                            await self.bus.publish(subjects.invite(node), announcement)
                nodes = None
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        arrived.wait(), timeout=min(REANNOUNCE_EVERY, max(0.0, end - loop.time()))
                    )
        finally:
            bids = self._bids.pop(job.id, [])
            self._excluded.pop(job.id, None)
            self._invited.pop(job.id, None)
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
            if selected(n, spec)
            and spec.resources.cpu <= n.cpu + 1e-9
            and spec.resources.memory <= n.memory
            and (n.network or not spec.network)
        ]

    def _operators_of(self, nodes: list[NodeInfo]) -> int:
        return len({self.operators.operator(n.node_id) for n in nodes})

    def _fits_now(self, node: NodeInfo, spec: JobSpec) -> int:
        """Free slots of ``node`` for ``spec`` (0 when it lacks the cpu or memory now), counting
        what its running executions and the bids it was invited to hold."""
        load = self._loads.get(node.node_id) or Load()
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
        picked: list[str] = []
        operators: set[str] = set()
        for _, _, node in ready:
            operator = self.operators.operator(node)
            if operator not in operators:  # one node per operator
                picked.append(node)
                operators.add(operator)
            if len(picked) == need:
                return picked
        return None

    def _hold(self, job: JobRecord, nodes: list[str]) -> None:
        self._bidding[job.id] = nodes
        for node in nodes:
            self._loads.setdefault(node, Load()).add(("bid", job.id), job.spec.resources)

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
            metrics.QUEUE_DEPTH.set(len(self._queue))
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
                if self._operators_of(fitting) >= need:
                    invited = self._pick(fitting, job.spec, need)
                    if invited is None:
                        break  # busy: wait for a slot (a job ending, a heartbeat, the watchdog)
                self._queue.popleft()
                metrics.QUEUE_WAIT.observe((now() - job.created_at).total_seconds())
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
            could_run = self._operators_of(self._fitting(spec)) >= need  # once busy ones have room
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
        except Fenced:
            raise  # the term ends: the next one (or another requester) goes on from the record
        except (nats.errors.Error, TimeoutError) as exc:
            # NATS away for longer than a retry: not the job's fault; it goes back to the queue
            self.log.warning("job.drive_interrupted", job=job_id, error=type(exc).__name__)
            self._enqueue(job_id, first=True)
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
            job_id, [*first, (partial(record_bids, bids=bids), "requester"), (fail, "requester")]
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
                (partial(record_bids, bids=chosen + others), "requester"),
                (choose, "requester"),
            ],
        )
        if job is None or job.final:
            await asyncio.gather(
                *(self._reject(job_id, b.node_id, "job ended") for b in chosen + others)
            )
            return
        crash_point("requester.assigned")
        await asyncio.gather(
            *(self._reject(job_id, b.node_id, "other workers chosen") for b in others),
            *(self._send_assignment(job, b.node_id) for b in chosen),
        )

    async def _lose(self, job_id: str, node_id: str, reason: str) -> None:
        """Give up on ``node_id``'s execution (the watchdog's part, ``Watchdog._lose``)."""
        raise NotImplementedError

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
            metrics.ASSIGNMENTS.labels("confirmed" if reply.ok else "declined").inc()
        except (nats.errors.Error, TimeoutError, ValueError) as exc:
            error = f"worker {node_id} did not confirm the assignment ({type(exc).__name__})"
            metrics.ASSIGNMENTS.labels("unanswered").inc()
        if error is not None:
            self.log.warning("assign.failed", job=job.id, node=node_id, error=error)
            await self._lose(job.id, node_id, error)
