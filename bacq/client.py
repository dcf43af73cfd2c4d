"""The client API: submit jobs, read their records, wait for them, fetch their results.

Touches NATS (submission request/reply, the jobs bucket read-only) and, for ``add`` and ``fetch``,
a kubo node. The CLI is a thin layer over this module; tests and scripts use it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from bacq import subjects, submission
from bacq.auth import NatsOptions
from bacq.bus import TRANSIENT, Bus, again
from bacq.errors import BatchRejected, JobNotFound, RequestRejected, SpecError, StorageError
from bacq.events import Event
from bacq.models import (
    CancelReply,
    CancelRequest,
    JobRecord,
    decode,
)
from bacq.spec import JobSpec, parse_spec

if TYPE_CHECKING:
    from bacq.storage import Storage  # the kubo client (aiohttp) loads only when used

__all__ = ["Client"]

WATCH_IDLE = 10.0  # seconds the server keeps a stopped (or cut-off) watch's consumer


class Client:
    def __init__(self, bus: Bus, nats_url: str) -> None:
        self.bus = bus
        self.nats_url = nats_url

    @classmethod
    async def connect(cls, nats_url: str, *, options: NatsOptions | None = None) -> Client:
        """``options``: credentials (default: the ``BACQ_NATS_*`` environment), e.g. a
        devstack's ``client_options()``."""
        return cls(await Bus.connect(nats_url, name="bacq-client", options=options), nats_url)

    async def close(self) -> None:
        await self.bus.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(
        self,
        spec: JobSpec | dict[str, Any],
        *,
        idempotency_key: str | None = None,
        timeout: float = 10.0,
        attempts: int = 3,
    ) -> str:
        """Validate ``spec`` here, hand it to the requester, return the job id.

        Every attempt carries the same idempotency key (a fresh one unless given), so a retry
        after a lost answer, or a second submission with the same key, gives the same job.
        """
        checked = parse_spec(spec)
        return await submission.submit_one(
            self.bus.nc,
            self.nats_url,
            checked.model_dump(mode="json"),
            idempotency_key=idempotency_key,
            timeout=timeout,
            attempts=attempts,
        )

    async def submit_many(
        self,
        specs: Sequence[JobSpec | dict[str, Any]],
        idempotency_keys: Sequence[str | None] | None = None,
        *,
        timeout: float = 60.0,
        attempts: int = 3,
    ) -> list[str]:
        """Validate every spec here, then submit them in batches (``bacq.api.submit_many``, at
        most ``SUBMIT_MANY_MAX`` specs and NATS's max payload per request); return the job ids
        in the order of ``specs``.

        An invalid spec raises SpecError naming each problem as ``INDEX.field`` and nothing is
        submitted. Specs the requester refuses raise BatchRejected, whose ``job_ids`` hold the
        id of every spec that was submitted (None for a refused one). Each spec carries its
        idempotency key (``idempotency_keys[i]``, or a fresh one), the same on every retry.
        """
        checked: list[dict[str, Any]] = []
        problems: list[tuple[str, str]] = []
        for index, spec in enumerate(specs):
            try:
                checked.append(parse_spec(spec).model_dump(mode="json"))
            except SpecError as exc:
                problems.extend((f"{index}.{field}", message) for field, message in exc.problems)
        if problems:
            raise SpecError(problems)
        outcomes = await submission.submit_many(
            self.bus.nc,
            self.nats_url,
            checked,
            idempotency_keys,
            timeout=timeout,
            attempts=attempts,
        )
        return job_ids_of(outcomes)

    async def cancel(self, job_id: str, *, timeout: float = 60.0) -> CancelReply:
        """Cancel a job: its containers are stopped and the workers' capacity freed."""
        job = await self.job(job_id)
        try:
            reply = await self.bus.request(
                subjects.CANCEL, CancelRequest(job_id=job.id), CancelReply, timeout=timeout
            )
        except nats.errors.NoRespondersError:
            raise RequestRejected(f"no requester is listening on NATS at {self.nats_url}") from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise RequestRejected(f"the requester did not answer within {timeout:g}s") from None
        if not reply.ok:
            raise RequestRejected(reply.error or f"job {job.id} could not be cancelled")
        return reply

    async def history(self, job_id: str) -> list[Event]:
        """The job's events, in order, replayed from JetStream."""
        job = await self.job(job_id)
        return sorted(await self.bus.job_events(job.id), key=lambda e: e.seq)

    def events(
        self,
        *,
        from_seq: int | None = None,
        since: dt.datetime | None = None,
        follow: bool = False,
    ) -> AsyncIterator[tuple[int, Event]]:
        """Every job's events from a stream sequence or a time, then (``follow``) live ones."""
        return self.bus.replay_events(from_seq=from_seq, since=since, follow=follow)

    async def jobs(self) -> list[JobRecord]:
        """Every job the bucket holds, newest first."""
        records = await asyncio.gather(*(self.bus.load_job(i) for i in await self.bus.job_ids()))
        found = [r for r in records if r is not None]
        return sorted(found, key=lambda r: r.created_at, reverse=True)

    async def job(self, job_id: str) -> JobRecord:
        """The job with this id, or with this unique id prefix."""
        record = await self.bus.load_job(job_id)
        if record is not None:
            return record
        matches = [i for i in await self.bus.job_ids() if i.startswith(job_id)]
        if len(matches) == 1:
            record = await self.bus.load_job(matches[0])
            if record is not None:
                return record
        if len(matches) > 1:
            raise JobNotFound(f"{job_id!r} matches {len(matches)} jobs; give more of the id")
        raise JobNotFound(f"no job {job_id!r}; `bacq list` shows the jobs there are")

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_change: Callable[[JobRecord], Awaitable[None] | None] | None = None,
    ) -> JobRecord:
        """Follow the job's record until it is final (or ``timeout`` passes: TimeoutError)."""
        job_id = (await self.job(job_id)).id
        watcher: Any = None
        revision = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    entry: KeyValue.Entry | None = None
                    if watcher is None:
                        # the watch is only an accelerator: while NATS is away, poll
                        with contextlib.suppress(*TRANSIENT, nats.js.errors.APIError):
                            # its consumer goes WATCH_IDLE s after the watch stops (nats-py's
                            # default, 5 min, lets waits on many jobs pile up consumers)
                            watcher = await self.bus.jobs.watch(
                                job_id, inactive_threshold=WATCH_IDLE
                            )
                    if watcher is not None:
                        with contextlib.suppress(nats.errors.TimeoutError):
                            entry = await watcher.updates(timeout=2.0)
                    else:
                        await asyncio.sleep(1.0)
                    if entry is None:  # quiet for a while, or no watch: read afresh
                        entry = await again(lambda: self.bus.jobs.get(job_id))
                    if entry.value is None or (entry.revision or 0) <= revision:
                        continue  # the end-of-history marker, or no newer than what was shown
                    revision = entry.revision or 0
                    job = decode(JobRecord, entry.value)
                    if on_change is not None:
                        maybe = on_change(job)
                        if maybe is not None:
                            await maybe
                    if job.final:
                        return job
        finally:
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()

    async def wait_all(
        self, job_ids: list[str], *, timeout: float | None = None
    ) -> dict[str, JobRecord]:
        """Wait until every one of ``job_ids`` is final (or ``timeout`` passes: TimeoutError);
        one watch over the jobs bucket for all of them (``wait`` watches one job)."""
        wanted, done = set(job_ids), dict[str, JobRecord]()
        async with asyncio.timeout(timeout):
            while True:
                watcher: Any = None
                with contextlib.suppress(*TRANSIENT):
                    watcher = await self.bus.jobs.watchall()
                try:
                    while watcher is not None and len(done) < len(wanted):
                        try:
                            entry = await watcher.updates(timeout=5.0)
                        except nats.errors.TimeoutError:
                            break  # quiet: read the missing ones afresh
                        if entry is None or entry.value is None or entry.key not in wanted:
                            continue
                        job = decode(JobRecord, entry.value)
                        if job.final:
                            done[job.id] = job
                finally:
                    if watcher is not None:
                        with contextlib.suppress(Exception):
                            await watcher.stop()
                for job_id in wanted - done.keys():  # the watch is only an accelerator
                    record = await self.bus.load_job(job_id)
                    if record is not None and record.final:
                        done[job_id] = record
                if len(done) == len(wanted):
                    return {job_id: done[job_id] for job_id in job_ids}
                if watcher is None:
                    await asyncio.sleep(1.0)

    async def fetch_results(self, storage: Storage, job: JobRecord, out_dir: Path) -> Path:
        """Download the accepted result of ``job`` into ``out_dir`` (stdout, stderr, exitCode…)."""
        if job.result_cid is None:
            raise StorageError(
                f"job {job.id} has no accepted result (state {job.state.value}"
                + (f": {job.reason}" if job.reason else "")
                + ")"
            )
        return await storage.fetch(job.result_cid, out_dir)


def job_ids_of(outcomes: Sequence[submission.Outcome]) -> list[str]:
    """The job ids of a bulk submission's outcomes, or BatchRejected naming each refused spec."""
    refused = [o for o in outcomes if not o.ok]
    if not refused:
        return [o.job_id for o in outcomes if o.job_id is not None]
    problems = [
        (f"{o.index}.{field}", message) for o in refused for field, message in o.problems
    ] + [(str(o.index), o.error) for o in refused if o.error and not o.problems]
    raise BatchRejected(
        f"the requester refused {len(refused)} of {len(outcomes)} specs (the other "
        f"{len(outcomes) - len(refused)} were submitted): "
        + "; ".join(f"{field}: {message}" for field, message in problems[:5])
        + ("; …" if len(problems) > 5 else ""),
        problems,
        [o.job_id for o in outcomes],
    )
