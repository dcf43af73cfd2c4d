"""The requester's ledger: job records and their events. Touches NATS (the ``bacq-jobs`` bucket
and the ``BACQ_EVENTS`` stream), of which the requester is the single writer.

Every change of a job record is first published as hash-chained events (``bacq.events``), then
saved, so a job's history is complete even if the process dies between the two (on start it rolls
records forward from their events).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
from collections.abc import Callable, Sequence
from datetime import timedelta

from bacq import metrics
from bacq.errors import Fenced
from bacq.events import Event, diff, fold, seal
from bacq.models import (
    JobRecord,
    now,
)
from bacq.requester._base import Commit, Core, Load, Step, copy_record
from bacq.states import EXEC_ACTIVE, JobState

# the states the watchdog looks at every second (lost workers, deadlines, the verifier's silence)
WATCHED = frozenset({JobState.RUNNING, JobState.VERIFYING})


def queue_end(job: JobRecord) -> dt.datetime:
    """When ``job`` has waited its ``queue_timeout`` in the queue (from its submission)."""
    return job.created_at + timedelta(seconds=job.spec.queue_timeout)


class Ledger(Core):
    async def _commit(self, job: JobRecord, events: list[Event], prev_hash: str) -> None:
        """Chain ``events`` after ``prev_hash`` and publish them, then save ``job`` with a
        compare-and-set on the revision this requester last wrote or read (0: a new record).

        Fenced: a requester whose lease has run out writes nothing, and one whose record was
        changed by another (the one that replaced it) stops (``self.fenced``)."""
        await self._commit_many([(job, events, prev_hash)])

    async def _commit_many(self, commits: Sequence[Commit]) -> None:
        """``_commit`` of several jobs at once. Commits made while the ledger writes others wait
        and go out together in the next write (a group commit): every job's events in one wait,
        then every record in one more, whatever number of jobs they hold."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commit_queue.append((commits, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._write_commits(), name="ledger-commits")
            self._tasks.add(self._committer)  # (stopped with the others)
            self._committer.add_done_callback(self._tasks.discard)
        await done

    async def _write_commits(self) -> None:
        while self._commit_queue:
            await asyncio.sleep(0)  # the commits made at this moment join this write
            taken, self._commit_queue = self._commit_queue, []
            try:
                await self._write([commit for commits, _ in taken for commit in commits])
            except Exception as exc:
                for _, done in taken:
                    if not done.done():
                        done.set_exception(exc)
            except BaseException:  # cancelled (the requester stops): so are the commits
                for _, done in taken:
                    done.cancel()
                raise
            else:
                for _, done in taken:
                    if not done.done():
                        done.set_result(None)

    async def _write(self, commits: Sequence[Commit]) -> None:
        """Seal and publish the events of ``commits``, then save their records."""
        if self.lease is not None and not await self.lease.ensure():
            self.fenced.set()
            raise Fenced("this requester's lease ran out: another one may be active")
        for job, events, prev_hash in commits:
            if events:
                seal(events, prev_hash, self.signer)
                job.event_seq, job.last_hash = events[-1].seq, events[-1].hash
        saved: set[str] = set()

        def kept(job_id: str, revision: int) -> None:
            self._revisions[job_id] = revision
            saved.add(job_id)

        try:
            chained = [
                (events, await self._events_after(job.id, events)) for job, events, _ in commits
            ]
            # each stored message's sequence and saved record's revision is kept as it comes,
            # also when another fails
            await self.bus.publish_events_many(chained, on_stored=self._last_events.__setitem__)
            await self.bus.save_jobs(
                [(job, self._revisions.get(job.id, 0)) for job, _, _ in commits], on_saved=kept
            )
        except Fenced:
            self.fenced.set()
            raise
        except BaseException:
            # a record whose events may be stored but which is not saved is behind its history:
            # the cache forgets it, and the next change reads it back and rolls it forward
            for job, _, _ in commits:
                if job.id not in saved:
                    self._records.pop(job.id, None)
                    self._revisions.pop(job.id, None)
                    self._last_events.pop(job.id, None)
            raise

    async def _events_after(self, job_id: str, events: list[Event]) -> int:
        """The stream sequence of the job's last events message, that ``events`` follow (0: it
        has none). Known from the ledger's own writes and loads; read when not."""
        known = self._last_events.get(job_id)
        if known is not None or not events or events[0].seq == 1:
            return known or 0  # (seq 1: a new job, none yet)
        last = await self.bus.last_events(job_id)
        if last is None:
            self._last_events[job_id] = 0
            return 0
        if last[0][-1].seq != events[0].seq - 1:
            raise Fenced(
                f"the history of job {job_id} is at seq {last[0][-1].seq}, its record at "
                f"{events[0].seq - 1}: another requester wrote it"
            )
        self._last_events[job_id] = last[1]
        return last[1]

    async def _load(self, job_id: str, *, to_change: bool = False) -> JobRecord | None:
        """A job record, from the cache or read back from NATS. ``to_change`` (under the job's
        lock): a record read back is first rolled forward to the end of its history."""
        job = self._records.get(job_id)
        if job is not None:
            return job
        found = await self.bus.load_job_entry(job_id)
        if found is None:
            return None
        job, self._revisions[job_id] = found
        return await self._reconcile(job) if to_change else job

    def _keep(self, job: JobRecord) -> None:
        """Remember ``job`` as committed: the cache, which nodes it keeps busy, its state in
        the metrics."""
        seen = self._states.get(job.id)
        if seen != job.state:
            if seen is not None:
                metrics.JOBS.labels(seen.value).dec()
            if job.final:
                self._states.pop(job.id, None)
                if seen is not None:  # (a final record read again, e.g. for a late report)
                    metrics.JOBS_FINISHED.labels(job.state.value).inc()
            else:
                self._states[job.id] = job.state
                metrics.JOBS.labels(job.state.value).inc()
        for node_id, execution in job.executions.items():
            load = self._loads.setdefault(node_id, Load())
            if execution.state in EXEC_ACTIVE and not job.final:
                load.add(("run", job.id), job.spec.resources)
            else:
                load.remove(("run", job.id))
        if job.final:
            self._records.pop(job.id, None)
            self._locks.pop(job.id, None)
            self._revisions.pop(job.id, None)
            self._last_events.pop(job.id, None)
        else:
            self._records[job.id] = job
        if job.state in WATCHED:
            self._watched.add(job.id)
        else:
            self._watched.discard(job.id)
        if job.state == JobState.PENDING and seen != JobState.PENDING:
            heapq.heappush(self._queue_ends, (queue_end(job), job.id))
            if len(self._queue_ends) > 2 * len(self._records) + 1024:
                # entries of jobs that left the queue (ended, or back after a retry) stay until
                # their time comes: with a long queue_timeout and many jobs, start afresh
                self._queue_ends = [
                    (queue_end(j), j.id)
                    for j in self._records.values()
                    if j.state == JobState.PENDING
                ]
                heapq.heapify(self._queue_ends)
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
            current = await self._load(job_id, to_change=True)
            if current is None:
                return None
            job = copy_record(current)
            events: list[Event] = []
            changed = False
            for change, actor in steps:
                before = copy_record(job)
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
        """Roll a record forward from its events if the process died between the two (and note
        where its history ends, for the next commit)."""
        last = await self.bus.last_events(job.id)
        self._last_events[job.id] = 0 if last is None else last[1]
        if last is None or last[0][-1].seq <= job.event_seq:
            return job
        rebuilt = fold(await self.bus.job_events(job.id))
        rebuilt.deadline, rebuilt.idempotency_key = job.deadline, job.idempotency_key
        self._revisions[job.id] = await self.bus.save_job(
            rebuilt, revision=self._revisions.get(job.id, 0)
        )
        self.log.info("job.rolled_forward", job=job.id, seq=rebuilt.event_seq)
        return rebuilt
