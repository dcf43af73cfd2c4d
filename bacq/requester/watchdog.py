"""The watchdog: lost workers, retries and deadlines of every unfinished job. Touches NATS."""

from __future__ import annotations

import asyncio
import heapq
import time
from functools import partial

import nats.errors
import nats.js.errors

from bacq import metrics
from bacq.models import (
    Execution,
    JobRecord,
    NodeInfo,
    now,
)
from bacq.requester._base import WATCH_EVERY
from bacq.requester.dispatch import Dispatch
from bacq.requester.ledger import WATCHED
from bacq.requester.record import move_exec, move_job
from bacq.states import EXEC_ACTIVE, ExecState, JobState


class Watchdog(Dispatch):
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
            lost = None if job is None else job.executions.get(node_id)
            if job is None or job.final or lost is None or lost.state != ExecState.LOST:
                return  # (a worker may hand back only an execution it holds)
            spec = job.spec
            if job.retries_used > spec.retries:
                metrics.EXECUTIONS_LOST.labels("no").inc()
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
            metrics.EXECUTIONS_LOST.labels("yes" if bids else "no").inc()
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
        """Queued jobs whose queue_timeout passed (from a heap: only those), then each running
        or verifying job (a set: bounded by the workers' slots, not by the queue)."""
        t, current = time.monotonic(), now()
        self._wake.set()  # heartbeats may have brought workers (or slots) to the queue
        while self._queue_ends and self._queue_ends[0][0] < current:
            _, job_id = heapq.heappop(self._queue_ends)
            job = self._records.get(job_id)
            if job is None or job.state != JobState.PENDING:
                continue  # it moved on (a later entry stands for a later stay in the queue)
            waited = (current - job.created_at).total_seconds()
            fitting = len(self._fitting(job.spec))
            reason = (
                f"waited {waited:.0f}s in the queue (queue_timeout "
                f"{job.spec.queue_timeout:g}s); {fitting} live worker(s) could run it, "
                "all busy"
            )
            await self.mutate(job.id, partial(move_job, target=JobState.FAILED, reason=reason))
        for job_id in list(self._watched):
            job = self._records.get(job_id)
            if job is None or job.state not in WATCHED:
                self._watched.discard(job_id)
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
