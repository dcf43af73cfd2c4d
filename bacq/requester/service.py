"""The requester: takes submissions, runs the bidding, assigns workers, records every state change.

Touches NATS only. Its parts, each a module of this package: ``intake`` (submissions and
cancellations), ``dispatch`` (worker capacity, the queue, bidding, assignment), ``watchdog`` (lost
workers, retries, deadlines), ``folding`` (progress and verdicts into records) and ``ledger`` (job
records and their hash-chained events; the requester is their single writer). This module puts them
together and runs them. On start it picks up every unfinished job and drives it to an end.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial

import nats.errors
from nats.aio.subscription import Subscription

from bacq import metrics, sdnotify, subjects
from bacq.bus import ensure_bucket
from bacq.errors import Fenced
from bacq.lease import RENEW_EVERY, Lease
from bacq.logs import ensure_logs_stream
from bacq.models import (
    JobRecord,
)
from bacq.nodes import nodes_bucket
from bacq.reputation import reputation_bucket
from bacq.requester._base import RequesterConfig
from bacq.requester.intake import Intake
from bacq.signing import publish_requester_keys

__all__ = ["Requester", "RequesterConfig"]
from bacq.states import ExecState, JobState
from bacq.terms import STOP_STEP, stop_tasks


class Requester(Intake):
    async def _resume(self) -> None:
        queued: list[JobRecord] = []
        for job_id in await self.bus.job_ids():
            found = await self.bus.load_job_entry(job_id)
            if found is None or found[0].final:
                continue
            job, self._revisions[job_id] = found
            job = await self._reconcile(job)
            self.log.info("job.resumed", job=job_id, state=job.state)
            if job.state in (JobState.PENDING, JobState.BIDDING):
                queued.append(job)
            elif job.deadline is None:
                job.deadline = self._results_deadline(job.spec)
                self._revisions[job_id] = await self.bus.save_job(
                    job, revision=self._revisions[job_id]
                )
            self._keep(job)
            # the choice was committed, but the previous process may have died before the
            # workers heard of it: tell them again (a worker that runs it already says ok)
            for execution in job.executions_in(ExecState.ACCEPTED):
                self._spawn(self._send_assignment(job, execution.node_id), f"reassign-{job_id}")
        for job in sorted(queued, key=lambda j: j.created_at):
            self._enqueue(job.id)

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, in terms: each term waits for the lease (another
        requester may be active: this one is then a standby) and serves while it holds it.
        A term ends when the lease is lost (NATS away too long, or another requester took
        over): the next one starts from a fresh state, read back from NATS."""
        term: Requester = self
        while True:
            try:
                await term._term(stop)
                return
            except Fenced as exc:
                if stop.is_set():
                    return
                self.log.warning("requester.deposed", reason=str(exc))
                term = type(self)(self.bus, self.config)
            except (nats.errors.Error, TimeoutError) as exc:
                # NATS away, or JetStream electing a leader, while the term starts or runs: the
                # term ends (its lease released) and the next one starts afresh a second later
                if stop.is_set():
                    return
                self.log.warning("requester.term_failed", error=f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RENEW_EVERY)
                term = type(self)(self.bus, self.config)

    async def _term(self, stop: asyncio.Event) -> None:
        self.lease = Lease(self.bus, "requester")
        standby = sdnotify.also_ready(
            partial(self.log.info, "service.ready", service="requester", standby=True)
        )
        if not await self.lease.acquire(stop, on_standby=standby):
            return
        try:
            await self._serve_active(stop)
        finally:
            await self.lease.release()
        if self.lease.lost.is_set() or self.fenced.is_set():
            raise Fenced("another requester took over; this one stopped (it may start again)")

    async def _serve_active(self, stop: asyncio.Event) -> None:
        assert self.lease is not None  # noqa: S101 (serve acquired it)
        metrics.start()
        metrics.observe(
            reconnects=lambda: self.bus.reconnects,
            dead_letters=lambda: dict(self.bus.dead_letters),
            offences=self.reputations.offences,
        )
        await self.bus.set_events_retention(
            max_age=self.config.events_max_age, max_bytes=self.config.events_max_bytes
        )
        self._idempotency = await ensure_bucket(self.bus.js, subjects.IDEMPOTENCY_BUCKET)
        self._answers = await ensure_bucket(self.bus.js, subjects.ANSWERS_BUCKET)
        # declared here for the workers, which may not use the JetStream API themselves
        await ensure_logs_stream(self.bus.js)
        await nodes_bucket(self.bus)
        keys = await publish_requester_keys(self.bus.js, self.signer)
        self.log.info("signing.key", key=self.signer.key_id, trusted=len(keys.keys))
        self.reputations.bucket = await reputation_bucket(self.bus)
        await self.reputations.load_all(self.bus)
        self.reputations.start()
        subs: list[Subscription] = []
        loops: list[asyncio.Task[None]] = []
        ends: list[asyncio.Task[object]] = []
        try:  # (a NATS error on the way up ends the term too: nothing of it is left behind)
            # no queue group: only the lease holder serves, and a frozen or cut-off one that is
            # still subscribed must not take requests away from it (the first answer wins)
            for subject, handler in (
                (subjects.SUBMIT, self.on_submit),
                (subjects.SUBMIT_MANY, self.on_submit_many),
                (subjects.CANCEL, self.on_cancel),
                (subjects.RELEASE, self.on_release),
                (subjects.HEARTBEATS_ALL, self.on_heartbeat),
                (subjects.BIDS_ALL, self.on_bid),
            ):
                subs.append(await self.bus.subscribe(subject, handler))
            await self._resume()
            loops += [
                asyncio.create_task(self._fold()),
                asyncio.create_task(self._watch()),
                asyncio.create_task(self._dispatch()),
            ]
            await self.bus.nc.flush()
            self.log.info("service.ready", service="requester", instance=self.lease.holder.instance)
            sdnotify.ready()
            ends += [
                asyncio.create_task(stop.wait()),
                asyncio.create_task(self.lease.lost.wait()),
                asyncio.create_task(self.fenced.wait()),
            ]
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for end in ends:
                end.cancel()
            # each step bounded: a connection cut off mid-term can leave a flush waiting on a
            # socket nobody reads (an unsubscribe, a last write), and the term must still end
            for sub in subs:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(STOP_STEP):
                        await sub.unsubscribe()
            await stop_tasks([*loops, *self._tasks])
            await self.reputations.stop(timeout=STOP_STEP)
            self.log.info("service.stopped", service="requester")
