"""The NATS side of every bacq process: connect, declare the stream and bucket, send and receive.

Touches the NATS connection only. Subject names come from ``bacq.subjects``; payloads are the models
of ``bacq.models``. Every process uses ``Bus.connect`` so reconnection and errors behave alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from pydantic import BaseModel

from bacq import subjects
from bacq.errors import NatsUnavailable
from bacq.events import Event
from bacq.log import get_logger
from bacq.models import JobRecord, decode, encode

__all__ = ["DEFAULT_NATS_URL", "TRANSIENT", "Bus", "again", "ensure_bucket"]

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
STREAM_MAX_AGE = 30 * 24 * 3600.0  # seconds of messages kept in the BACQ stream
EVENTS_MAX_AGE = 365 * 24 * 3600.0  # default retention of job histories: a year …
EVENTS_MAX_BYTES = 10 * 1024**3  # … or 10 GiB, whichever comes first (oldest go first)
DUPLICATE_WINDOW = 120.0  # seconds within which a repeated Nats-Msg-Id is dropped

M = TypeVar("M", bound=BaseModel)
log = get_logger("bacq.bus")


class Bus:
    """One NATS connection with JetStream, the BACQ stream and the jobs bucket."""

    closing = False  # set while closing on purpose: the disconnect then is no news
    reconnected_at = 0.0  # monotonic time of the last reconnection (nothing was heard before it)

    def __init__(self, nc: NatsClient, js: JetStreamContext, jobs: KeyValue) -> None:
        self.nc = nc
        self.js = js
        self.jobs = jobs

    @classmethod
    async def connect(cls, url: str, *, name: str, wait: float = 5.0) -> Bus:
        """Connect, then declare the stream and the bucket.

        The first connection is tried for ``wait`` seconds (a CLI fails fast; services wait
        longer for a server that is still starting); once connected, drops reconnect forever.
        """
        bus: Bus | None = None

        async def on_error(exc: Exception) -> None:
            # before the first connection, failures are the NatsUnavailable raised below
            (log.warning if bus is not None else log.debug)("nats.error", error=str(exc))

        async def on_disconnect() -> None:
            if bus is not None and not bus.closing:
                log.warning("nats.disconnected")

        async def on_reconnect() -> None:
            if bus is not None:
                bus.reconnected_at = time.monotonic()
            log.info("nats.reconnected")

        try:
            async with asyncio.timeout(wait):
                nc = await nats.connect(
                    url,
                    name=name,
                    connect_timeout=min(wait, 5.0),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            why = f"no answer within {wait:g}s" if isinstance(exc, TimeoutError) else str(exc)
            raise NatsUnavailable(
                f"cannot reach NATS at {url} ({why}); start one with "
                "`bacq devstack` or set BACQ_NATS_URL / --nats to a running server"
            ) from None
        js = nc.jetstream()
        try:
            await _ensure_streams(js)
            jobs = await ensure_bucket(js, subjects.JOBS_BUCKET)
        except (nats.errors.Error, TimeoutError) as exc:
            await nc.close()
            raise NatsUnavailable(
                f"NATS at {url} has no usable JetStream ({exc}); start nats-server with -js"
            ) from None
        bus = cls(nc, js, jobs)
        return bus

    async def close(self) -> None:
        self.closing = True
        # flush what was published, then close: drain() waits up to 30 s on pull subscriptions
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self.nc.close()

    # -- core NATS --------------------------------------------------------------------------------
    async def publish(self, subject: str, message: BaseModel) -> None:
        await self.nc.publish(subject, encode(message))

    async def request(
        self, subject: str, message: BaseModel, reply: type[M], *, timeout: float
    ) -> M:
        msg = await self.nc.request(subject, encode(message), timeout=timeout)
        return decode(reply, msg.data)

    async def subscribe(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]], *, queue: str = ""
    ) -> Subscription:
        return await self.nc.subscribe(subject, queue=queue, cb=handler)

    # -- JetStream --------------------------------------------------------------------------------
    async def publish_durable(self, subject: str, message: BaseModel, *, msg_id: str) -> None:
        """Publish into the BACQ stream; a retry with the same ``msg_id`` is stored once."""
        delay = 0.2
        while True:
            try:
                await self.js.publish(subject, encode(message), headers={"Nats-Msg-Id": msg_id})
                return
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.errors.ConnectionReconnectingError,
            ) as exc:
                # the server is away (restart, network): keep the message and try again
                log.warning("bus.publish_retry", subject=subject, error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def consume(
        self, filter_subject: str, durable: str, *, batch: int = 64, ack_wait: float = 30.0
    ) -> AsyncIterator[Msg]:
        """Yield messages of a durable pull consumer forever; the caller acks each one."""
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait,
            max_deliver=-1,
            filter_subject=filter_subject,
        )
        sub = await self.js.pull_subscribe(
            filter_subject, durable=durable, stream=subjects.STREAM, config=config
        )
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue  # nothing new: fetch raises on an empty batch
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                return
            except nats.errors.Error as exc:
                log.warning("bus.fetch_failed", consumer=durable, error=str(exc))
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                yield msg

    async def set_events_retention(self, *, max_age: float, max_bytes: int) -> None:
        """Apply the retention of the BACQ_EVENTS stream (seconds, bytes; 0 = unlimited)."""
        info = await self.js.stream_info(subjects.EVENTS_STREAM)
        config = info.config
        if config.max_age == max_age and config.max_bytes == (max_bytes or -1):
            return
        config.max_age = max_age
        config.max_bytes = max_bytes or -1
        await self.js.update_stream(config)
        log.info("events.retention", max_age=max_age, max_bytes=max_bytes)

    async def publish_events(self, events: list[Event]) -> None:
        for event in events:
            await self.publish_durable(
                subjects.events(event.job_id), event, msg_id=f"ev.{event.job_id}.{event.seq}"
            )

    async def replay_events(
        self,
        filter_subject: str = subjects.EVENTS_ALL,
        *,
        from_seq: int | None = None,
        since: dt.datetime | None = None,
        follow: bool = False,
    ) -> AsyncIterator[tuple[int, Event]]:
        """Yield (stream sequence, event) from the events stream, oldest first; with ``follow``,
        go on with new events forever. An ephemeral consumer: nothing is left behind."""
        if from_seq is not None:
            policy, start_seq, start_time = DeliverPolicy.BY_START_SEQUENCE, from_seq, None
        elif since is not None:
            policy, start_seq, start_time = DeliverPolicy.BY_START_TIME, None, since
        else:
            policy, start_seq, start_time = DeliverPolicy.ALL, None, None
        config = ConsumerConfig(
            deliver_policy=policy,
            opt_start_seq=start_seq,
            opt_start_time=start_time,
            ack_policy=AckPolicy.EXPLICIT,
            filter_subject=filter_subject,
            inactive_threshold=60.0,
        )
        sub = await self.js.pull_subscribe(
            filter_subject, stream=subjects.EVENTS_STREAM, config=config
        )
        try:
            while True:
                try:
                    msgs = await sub.fetch(256, timeout=0.5)
                except (TimeoutError, nats.errors.TimeoutError):
                    msgs = []
                for msg in msgs:
                    await msg.ack()
                    yield msg.metadata.sequence.stream, decode(Event, msg.data)
                if msgs and not follow and not msgs[-1].metadata.num_pending:
                    return  # that was the last one: no need to wait for an empty fetch
                if not msgs and not follow:
                    info = await sub.consumer_info()
                    if not info.num_pending:
                        return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def job_events(self, job_id: str) -> list[Event]:
        return [event async for _, event in self.replay_events(subjects.events(job_id))]

    # -- job records ------------------------------------------------------------------------------
    async def load_job(self, job_id: str) -> JobRecord | None:
        try:
            entry = await again(lambda: self.jobs.get(job_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return decode(JobRecord, entry.value)

    async def save_job(self, job: JobRecord) -> None:
        await again(lambda: self.jobs.put(job.id, encode(job)))

    async def job_ids(self) -> list[str]:
        async def keys() -> list[str]:
            try:
                return list(await self.jobs.keys())
            except nats.js.errors.NoKeysError:
                return []

        return await again(keys)


T = TypeVar("T")
TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
)


async def again(call: Callable[[], Awaitable[T]], attempts: int = 15) -> T:
    """``call()``, asked again while JetStream is away for a moment (a server restart)."""
    for attempt in range(1, attempts):
        try:
            return await call()
        except TRANSIENT:
            await asyncio.sleep(min(0.2 * attempt, 1.0))
    return await call()


def _stream_configs() -> list[StreamConfig]:
    return [
        StreamConfig(
            name=subjects.STREAM,
            subjects=list(subjects.STREAM_SUBJECTS),
            storage=StorageType.FILE,
            max_age=STREAM_MAX_AGE,
            duplicate_window=DUPLICATE_WINDOW,
        ),
        StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[subjects.EVENTS_ALL],
            storage=StorageType.FILE,
            max_age=EVENTS_MAX_AGE,
            max_bytes=EVENTS_MAX_BYTES,
            duplicate_window=DUPLICATE_WINDOW,
        ),
    ]


async def _ensure_streams(js: JetStreamContext) -> None:
    """Create the streams that are missing; an existing stream keeps its (operator's) settings."""
    for config in _stream_configs():
        try:
            await js.stream_info(str(config.name))
        except nats.js.errors.NotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # created concurrently
                await js.add_stream(config)


async def ensure_bucket(js: JetStreamContext, name: str) -> KeyValue:
    """The key-value bucket ``name`` (file storage), created when missing."""
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await js.create_key_value(
                KeyValueConfig(bucket=name, history=5, storage=StorageType.FILE)
            )
        return await js.key_value(name)
