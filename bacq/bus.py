"""The NATS side of every bacq process: connect, declare the stream and bucket, send and receive.

Touches the NATS connection only. Subject names come from ``bacq.subjects``; payloads are the models
of ``bacq.models``. Every process uses ``Bus.connect`` so reconnection and errors behave alike.
Credentials, TLS and the role's inbox prefix come from ``bacq.auth.NatsOptions``; only the
requester and the verifier declare the streams and buckets, all of them, from the table in
``bacq.streams`` (workers and clients may lack the JetStream API permissions to do so, see
deploy/nats/auth.conf).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime as dt
import functools
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

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
)
from nats.js.kv import KeyValue
from pydantic import BaseModel

from bacq import corenats, streams, subjects
from bacq._jspublish import Ack, AckInbox, Outgoing
from bacq.auth import NatsOptions
from bacq.errors import Fenced, NatsUnavailable
from bacq.events import Event, decode_events, encode_events
from bacq.log import get_logger
from bacq.models import JobRecord, decode, encode

__all__ = [
    "DEFAULT_NATS_URL",
    "TRANSIENT",
    "Bus",
    "DeadLetter",
    "again",
    "ensure_bucket",
    "last_delivery",
    "new_nonce",
]

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
PULL_EXPIRES = 5.0  # seconds a pull request of a consumer stays open on the server
# the retention of the streams is in the table of bacq.streams; these names are kept for readers
STREAM_MAX_AGE = streams.STREAMS[subjects.STREAM].max_age  # seconds kept in the BACQ stream
EVENTS_MAX_AGE = streams.STREAMS[subjects.EVENTS_STREAM].max_age  # job histories: a year …
EVENTS_MAX_BYTES = streams.STREAMS[subjects.EVENTS_STREAM].max_bytes  # … or 10 GiB
REPLICAS_ENV = streams.REPLICAS_ENV
DECLARING_ROLES = ("requester", "verifier")
DUPLICATE_WINDOW = streams.DUPLICATE_WINDOW
DEAD_KEEP = 64 * 1024  # bytes of a dead-lettered message kept
DEAD_MAX_AGE = streams.STREAMS[subjects.DEAD_STREAM].max_age  # dead letters: 30 days …
DEAD_MAX_BYTES = streams.STREAMS[subjects.DEAD_STREAM].max_bytes  # … or 256 MiB
# a server that stops answering (cut off, not closed: no FIN, no RST) is left for another of the
# cluster after PING_INTERVAL * MAX_OUTSTANDING_PINGS seconds (nats-py's default: 4 minutes)
PING_INTERVAL = 5
MSG_ID_IN_PROCESS = 10158  # JetStream: "duplicate message id is in process" (a retry too soon)
MAX_OUTSTANDING_PINGS = 3

JS_PUBLISH_TIMEOUT = 5.0  # seconds for a JetStream publish's acknowledgement (nats-py's default)
KV_KEYS_TIMEOUT = 10.0  # seconds for a page of a bucket's keys (100,000 of them: ~2 MB)
WRONG_LAST_SEQUENCE = (10071, 10164)  # a key-value compare-and-set found another revision
EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
NO_MESSAGE_FOUND = 10037  # JetStream's message get: the key has no value (a missing stream: 10059)
JOBS_KEY = f"$KV.{subjects.JOBS_BUCKET}."  # the subject of a job record is JOBS_KEY + job id
JS_RETRY_FOR = 30.0  # seconds a job-record read/write retries while JetStream is away (failover)
# the server or the stream's leader is away (restart, network, a cluster electing a new leader)
TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
log = get_logger("bacq.bus")


class Bus:
    """One NATS connection with JetStream, the BACQ stream and the jobs bucket."""

    closing = False  # set while closing on purpose: the disconnect then is no news
    reconnected_at = 0.0  # monotonic time of the last reconnection (nothing was heard before it)

    def __init__(self, nc: NatsClient, js: JetStreamContext, jobs: KeyValue) -> None:
        self.nc = nc
        self.js = js
        self.jobs = jobs
        self.reconnects = 0  # since the process started (bacq.metrics reads them)
        self.servers: list[str] = []
        self.name = ""
        self.options = NatsOptions()
        self.dead_letters: collections.Counter[str] = collections.Counter()  # per consumer
        self.acks = AckInbox(nc)  # JetStream publishes: acknowledgements on one inbox

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        wait: float = 5.0,
        options: NatsOptions | None = None,
    ) -> Bus:
        """Connect, then declare the stream and the bucket (requester and verifier only).

        The first connection is tried for ``wait`` seconds (a CLI fails fast; services wait
        longer for a server that is still starting); once connected, drops reconnect forever.
        ``options`` default to the ``BACQ_NATS_*`` environment for the role named in ``name``
        (``bacq-worker-w1`` is a worker, ``bacq-client`` a client). ``url`` may list several
        servers separated by commas (a cluster).
        """
        if options is None:
            options = NatsOptions.from_env(_role(name))
        bus: Bus | None = None
        refused: list[str] = []  # authorization errors before the first connection

        async def on_error(exc: Exception) -> None:
            # nats-py reports it as a plain Error "nats: 'Authorization Violation'"
            if bus is None and "authorization violation" in str(exc).lower():
                refused.append(str(exc))
            # before the first connection, failures are the NatsUnavailable raised below
            (log.warning if bus is not None else log.debug)("nats.error", error=str(exc))

        async def on_disconnect() -> None:
            if bus is not None and not bus.closing:
                log.warning("nats.disconnected")

        async def on_reconnect() -> None:
            if bus is not None:
                bus.reconnected_at = time.monotonic()
                bus.reconnects += 1
            log.info("nats.reconnected")

        try:
            async with asyncio.timeout(wait):
                nc = await nats.connect(
                    [u.strip() for u in url.split(",") if u.strip()],
                    name=name,
                    connect_timeout=min(wait, 5.0),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    ping_interval=PING_INTERVAL,
                    max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    **options.connect_kwargs(),
                )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            why = f"no answer within {wait:g}s" if isinstance(exc, TimeoutError) else str(exc)
            if refused or isinstance(exc, nats.errors.AuthorizationError):
                raise NatsUnavailable(
                    f"NATS at {url} refused {name} ({options.describe()}): authorization "
                    "violation; check the "
                    "credentials (BACQ_NATS_USER/_PASSWORD, _TOKEN, _CREDS or _NKEY)"
                ) from None
            raise NatsUnavailable(
                f"cannot reach NATS at {url} ({why}); start one with "
                "`bacq devstack` or set BACQ_NATS_URL / --nats to a running server"
            ) from None
        js = nc.jetstream()
        try:
            if options.role in DECLARING_ROLES:
                await streams.ensure_all(js)
                jobs = await ensure_bucket(js, subjects.JOBS_BUCKET)
            elif options.role == "worker":  # workers never read job records: bind, no lookup
                jobs = KeyValue(
                    name=subjects.JOBS_BUCKET,
                    stream=f"KV_{subjects.JOBS_BUCKET}",
                    pre=f"$KV.{subjects.JOBS_BUCKET}.",
                    js=js,
                    direct=False,
                )
            else:
                jobs = await ensure_bucket(js, subjects.JOBS_BUCKET)
        except (nats.errors.Error, TimeoutError) as exc:
            await nc.close()
            raise NatsUnavailable(
                f"NATS at {url} has no usable JetStream ({exc}); start nats-server with -js"
            ) from None
        bus = cls(nc, js, jobs)
        # how to open another connection like this one (bacq.lease renews on its own)
        bus.servers = [u.strip() for u in url.split(",") if u.strip()]
        bus.name, bus.options = name, options
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
        """A core NATS request, its reply on ``self.acks``' inbox (nats-py's ``request`` costs a
        future, a timer task and an inbox token of its own per call). Raises
        ``NoRespondersError`` when nobody listens and ``TimeoutError`` when nobody answers, as
        nats-py does."""
        msg = await self.acks.request(subject, encode(message), timeout=timeout)
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            raise nats.errors.NoRespondersError
        return decode(reply, msg.data)

    async def subscribe(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]], *, queue: str = ""
    ) -> Subscription:
        return await self.nc.subscribe(subject, queue=queue, cb=handler)

    # -- JetStream --------------------------------------------------------------------------------
    async def publish_durable(
        self, subject: str, message: BaseModel | bytes, *, msg_id: str
    ) -> bool:
        """Publish into a stream; a retry with the same ``msg_id`` is stored once.

        Returns False when the stream already held ``msg_id``. After a retry of ours that is
        expected; on the first attempt it means someone else used the id (ids must be
        unguessable: see ``new_nonce``), and it is logged as an error."""
        data = message if isinstance(message, bytes) else encode(message)
        return (await self.publish_durable_many([(subject, data, msg_id)]))[0]

    async def publish_durable_many(self, messages: Sequence[tuple[str, bytes, str]]) -> list[bool]:
        """``publish_durable`` of many (subject, data, msg_id) at once: published back to back,
        one wait for all their acknowledgements; those not stored are published again (same
        ids) until they are. One False per message the stream already held."""
        answers = await self._publish_until_answered(
            [(subject, data, {"Nats-Msg-Id": msg_id}) for subject, data, msg_id in messages]
        )
        stored: list[bool] = []
        for (subject, _, msg_id), (ack, first) in zip(messages, answers, strict=True):
            ack.raise_for()
            stored.append(not ack.duplicate)
            if ack.duplicate:
                (log.error if first else log.debug)(
                    "bus.duplicate_msg_id", subject=subject, msg_id=msg_id, first_attempt=first
                )
        return stored

    async def _publish_until_answered(self, messages: Sequence[Outgoing]) -> list[tuple[Ack, bool]]:
        """Publish ``messages`` (each with a Nats-Msg-Id: a retry is stored once) back to back,
        one wait for all their acknowledgements, and again those not stored for a passing reason
        (the server away, a leader being elected, our earlier try with the same id still being
        stored: 409, err_code 10158) until each has another answer. Each one's answer (stored,
        duplicate, or an error of its own), and whether it came on the first round."""
        answers: list[tuple[Ack, bool] | None] = [None] * len(messages)
        todo = list(range(len(messages)))
        delay = 0.2
        first = True
        while todo:
            acks = await self.acks.publish_many(
                [messages[i] for i in todo], timeout=JS_PUBLISH_TIMEOUT
            )
            retry: list[int] = []
            for i, ack in zip(todo, acks, strict=True):
                try:
                    ack.raise_for()
                except TRANSIENT:
                    retry.append(i)
                    continue
                except nats.js.errors.APIError as exc:
                    if exc.err_code == MSG_ID_IN_PROCESS:
                        retry.append(i)
                        continue
                answers[i] = (ack, first)
            if retry:
                log.warning("bus.publish_retry", subject=messages[retry[0]][0], messages=len(retry))
                first = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            todo = retry
        return [answer for answer in answers if answer is not None]

    async def dead_letter(self, msg: Msg, consumer: str, reason: str) -> None:
        """Give up on ``msg``: keep a copy (at most ``DEAD_KEEP`` bytes of it) with the reason in
        the BACQ_DEAD stream for ``bacq events --dead-letters``, and terminate its delivery."""
        self.dead_letters[consumer] += 1
        log.warning(
            "message.dead_letter", consumer=consumer, subject=msg.subject, reason=reason[:200]
        )
        headers = {
            "Bacq-Reason": reason[:1000].replace("\r", " ").replace("\n", " "),
            "Bacq-Subject": msg.subject,
            "Bacq-Consumer": consumer,
        }
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.js.publish(subjects.dead(consumer), msg.data[:DEAD_KEEP], headers=headers)
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await msg.term()

    async def consume_batches(
        self,
        filter_subject: str | list[str],
        durable: str,
        *,
        stream: str = subjects.STREAM,
        batch: int = 64,
        ack_wait: float = 30.0,
    ) -> AsyncIterator[list[Msg]]:
        """Yield the messages of a durable pull consumer forever, as fetched (up to ``batch`` at
        a time, in stream order); the caller acks each one. Several filter subjects make one
        consumer over all of them (their messages interleaved in stream order)."""
        filters = [filter_subject] if isinstance(filter_subject, str) else filter_subject
        config = ConsumerConfig(
            name=durable,
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait,
            # a message that keeps failing stops being delivered (the consumer dead-letters it
            # on its last delivery, see ``last_delivery``): none can block the others forever
            max_deliver=subjects.MAX_DELIVER,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
        )
        # created, or updated to this config: a durable's changed config is otherwise ignored
        await again(lambda: self.js.add_consumer(stream, config))
        async for msgs in self._pull(stream, durable, batch):
            yield msgs

    async def _pull(self, stream: str, durable: str, batch: int) -> AsyncIterator[list[Msg]]:
        """A pull consumer's messages as they come, in groups of what is already there.

        nats-py's ``fetch(n)`` holds a message that arrives alone until ``n`` came or its pull
        expired (up to the fetch's timeout: hundreds of ms per hop of a quiet job). Here pull
        requests stay open (``PULL_EXPIRES``), a new one goes out while half of the last is
        still to come, and each message is handed on at once with whatever else has arrived."""
        inbox = self.nc.new_inbox()
        arrived: asyncio.Queue[Msg] = asyncio.Queue()

        async def take(msg: Msg) -> None:
            arrived.put_nowait(msg)  # (bounded: at most the messages pulled for)

        sub = await self.nc.subscribe(inbox, cb=take)
        pull = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        request = json.dumps({"batch": batch, "expires": int(PULL_EXPIRES * 1e9)}).encode()
        wanted = 0  # messages asked for that have not come yet
        try:
            while True:
                if wanted <= batch // 2:
                    try:
                        await self.nc.publish(pull, request, reply=inbox)
                    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                        return
                    except nats.errors.Error as exc:  # (reconnecting, its buffer full)
                        log.warning("bus.pull_failed", consumer=durable, error=str(exc))
                        await asyncio.sleep(1.0)
                        continue
                    wanted += batch
                try:
                    msg = await asyncio.wait_for(arrived.get(), timeout=PULL_EXPIRES + 1.0)
                except TimeoutError:
                    wanted = 0  # not even the end of a pull came (lost with a reconnect): anew
                    continue
                if self.nc.is_closed:
                    return
                msgs: list[Msg] = []
                while True:
                    headers = msg.headers or {}
                    status = headers.get("Status")
                    if status is None and msg.reply:
                        msgs.append(msg)
                        wanted -= 1
                    elif status in ("404", "408", "409"):
                        # a pull ended (expired, or the server let it go) with this many of its
                        # messages never sent
                        left = headers.get("Nats-Pending-Messages")
                        wanted = max(0, wanted - int(left)) if left and left.isdigit() else 0
                        if status == "409":  # (a leader changed, the consumer went): not at once
                            why = headers.get("Description", "")
                            log.warning("bus.pull_ended", consumer=durable, why=why[:200])
                            await asyncio.sleep(1.0 if "delete" in why.lower() else 0.1)
                    elif status == "503":  # no such consumer (yet), or JetStream away
                        log.warning("bus.pull_failed", consumer=durable, error="no responders")
                        await asyncio.sleep(1.0)
                        wanted = 0
                    if len(msgs) >= batch or arrived.empty():
                        break
                    msg = arrived.get_nowait()
                if msgs:
                    yield msgs
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def read_dead_letters(self, *, last: int = 50) -> list[DeadLetter]:
        """The ``last`` messages of the BACQ_DEAD stream, oldest first (``bacq events
        --dead-letters``)."""
        try:
            info = await self.js.stream_info(subjects.DEAD_STREAM)
        except nats.js.errors.NotFoundError:
            return []
        if not info.state.messages or last <= 0:
            return []  # (an empty stream reports sequence 0, which no message has)
        first = max(info.state.first_seq, info.state.last_seq - last + 1, 1)
        letters: list[DeadLetter] = []
        for seq in range(first, info.state.last_seq + 1):
            try:
                msg = await self.js.get_msg(subjects.DEAD_STREAM, seq)
            except nats.js.errors.NotFoundError:
                continue
            headers = msg.headers or {}
            letters.append(
                DeadLetter(
                    seq=seq,
                    at=msg.time,
                    consumer=headers.get("Bacq-Consumer", ""),
                    subject=headers.get("Bacq-Subject", ""),
                    reason=headers.get("Bacq-Reason", ""),
                    data=msg.data or b"",
                )
            )
        return letters

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

    async def publish_events(self, events: list[Event], *, after: int) -> int:
        """Publish one commit's events (one job's, in seq order) as one message, one round trip
        however many changes it holds, chained to the job's events message at stream sequence
        ``after`` (0: the job has none yet); its stream sequence. See ``publish_events_many``."""
        return (await self.publish_events_many([(events, after)]))[0]

    async def publish_events_many(
        self,
        commits: Sequence[tuple[list[Event], int]],
        *,
        on_stored: Callable[[str, int], None] | None = None,
    ) -> list[int]:
        """Publish each commit's events (of different jobs) at once, one wait for all; the
        stream sequence of each commit's message (0 for a commit without events).

        A commit ``(events, after)`` is stored only while the last events message of its job is
        still the one at stream sequence ``after`` (0: none yet): a job's history grows from its
        end or not at all. A deposed requester's message that arrives late (held in a socket
        while its host was cut off, or resent after its lease ran out) is refused rather than
        stored beside the one its successor wrote with the same seq. ``Fenced`` when a job's
        history had moved on (the others are stored; ``on_stored(job id, stream sequence)`` is
        called for each as it is known to be). A retry of ours is no conflict: the server checks
        the expected sequence before the message id, so it is known by its bytes, found at the
        end of the job's history. Those not stored for a passing reason (the server away, a
        leader being elected) are sent again until they are."""
        messages = {i: _events_message(events) for i, (events, _) in enumerate(commits) if events}
        answers = await self._publish_until_answered(
            [
                (subject, data, {"Nats-Msg-Id": msg_id, EXPECTED_LAST: str(commits[i][1])})
                for i, (subject, data, msg_id) in messages.items()
            ]
        )
        stored = [0] * len(commits)
        conflicts: list[int] = []
        for i, (ack, _) in zip(messages, answers, strict=True):
            try:
                ack.raise_for()
            except nats.js.errors.APIError as exc:
                if exc.err_code not in WRONG_LAST_SEQUENCE:
                    raise
                conflicts.append(i)
                continue
            stored[i] = ack.seq  # (a duplicate's acknowledgement names the stored one)
            if on_stored is not None:
                on_stored(commits[i][0][0].job_id, ack.seq)
        for i in conflicts:
            subject, data, _ = messages[i]
            last = await again(
                functools.partial(self.last_message, subjects.EVENTS_STREAM, subject)
            )
            if last is None or last[0] != data:
                job_id = commits[i][0][0].job_id
                raise Fenced(
                    f"the history of job {job_id} has moved on since stream sequence "
                    f"{commits[i][1]}: another requester wrote it"
                )
            stored[i] = last[1]
            if on_stored is not None:
                on_stored(commits[i][0][0].job_id, last[1])
        return stored

    async def last_events(self, job_id: str) -> tuple[list[Event], int] | None:
        """The last events message of a job: its events and stream sequence; None when the job
        has none (never had, or they aged out of the stream)."""
        last = await again(
            functools.partial(self.last_message, subjects.EVENTS_STREAM, subjects.events(job_id))
        )
        return None if last is None else (decode_events(last[0]), last[1])

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
                    for event in decode_events(msg.data):
                        yield msg.metadata.sequence.stream, event
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
        """One job's events, by seq."""
        events = [event async for _, event in self.replay_events(subjects.events(job_id))]
        return sorted(events, key=lambda e: e.seq)

    # -- job records ------------------------------------------------------------------------------
    async def get_value(self, bucket: str, key: str) -> tuple[bytes, int] | None:
        """The value of ``key`` in ``bucket`` and its revision, or None when it has none (never
        written, deleted or purged): JetStream's message get, answered on ``self.acks``' inbox
        (``KeyValue.get`` costs a request of nats-py's and a JSON API round of its own). Raises
        what ``KeyValue.get`` raises while JetStream is away (``TRANSIENT``)."""
        message = await self._get_last(f"KV_{bucket}", f"$KV.{bucket}.{key}")
        return None if message is None else corenats.kv_entry(message)

    async def last_message(self, stream: str, subject: str) -> tuple[bytes, int] | None:
        """The data and stream sequence of the last message on ``subject`` in ``stream``, or
        None when it has none. Raises as ``get_value``."""
        message = await self._get_last(stream, subject)
        if message is None:
            return None
        return base64.b64decode(message.get("data") or ""), int(message.get("seq") or 0)

    async def _get_last(self, stream: str, subject: str) -> dict[str, Any] | None:
        """JetStream's message get of the last message on ``subject``: the answer's ``message``
        (base64 data and headers, its seq), or None when there is none."""
        answer = await self._js_api(
            f"$JS.API.STREAM.MSG.GET.{stream}",
            {"last_by_subj": subject},
            JS_PUBLISH_TIMEOUT,
            absent=NO_MESSAGE_FOUND,
        )
        if answer is None:
            return None
        message: dict[str, Any] = answer.get("message") or {}
        return message

    async def _js_api(
        self, subject: str, request: dict[str, Any], timeout: float, *, absent: int | None = None
    ) -> dict[str, Any] | None:
        """A JetStream API request answered on ``self.acks``' inbox: its answer, or None when
        the answer is the error ``absent``. Raises ``NoRespondersError`` when nobody answers
        (JetStream away), ``APIError`` for any other error."""
        reply = await self.acks.request(subject, json.dumps(request).encode(), timeout=timeout)
        if not reply.data and reply.headers and reply.headers.get("Status") == "503":
            raise nats.errors.NoRespondersError
        answer: dict[str, Any] = json.loads(reply.data)
        error = answer.get("error")
        if error is not None:
            if absent is not None and error.get("err_code") == absent:
                return None
            raise nats.js.errors.APIError.from_error(error)
        return answer

    async def load_job(self, job_id: str) -> JobRecord | None:
        found = await self.load_job_entry(job_id)
        return None if found is None else found[0]

    async def load_job_entry(self, job_id: str) -> tuple[JobRecord, int] | None:
        """A job record and its revision (for ``save_job``'s compare-and-set)."""
        found = await again(functools.partial(self.get_value, subjects.JOBS_BUCKET, job_id))
        if found is None or not found[0]:
            return None
        return decode(JobRecord, found[0]), found[1]

    async def save_job(self, job: JobRecord, *, revision: int | None = None) -> int:
        """Write a job record; returns its new revision. With ``revision`` (0: the record must
        not exist yet) the write is a compare-and-set: if someone else wrote the record since,
        ``Fenced`` is raised and nothing is written (a deposed requester cannot overwrite the
        decisions of the one that replaced it)."""
        return (await self.save_jobs([(job, revision)]))[0]

    async def save_jobs(
        self,
        writes: Sequence[tuple[JobRecord, int | None]],
        *,
        on_saved: Callable[[str, int], None] | None = None,
    ) -> list[int]:
        """``save_job`` of many records at once (one wait for all their acknowledgements);
        their new revisions. ``Fenced`` when any was written by someone else since (the others
        are written); while JetStream is away, retried for ``JS_RETRY_FOR`` seconds.
        ``on_saved(job id, revision)`` is called for each record as it is known to be saved, so
        that a caller keeps the revisions of those saved before an error."""
        data = [encode(job) for job, _ in writes]
        revisions = [0] * len(writes)
        todo = list(range(len(writes)))
        deadline = asyncio.get_running_loop().time() + JS_RETRY_FOR
        delay = 0.2
        conflicts: list[int] = []
        while todo:
            acks = await self.acks.publish_many(
                [
                    (
                        JOBS_KEY + writes[i][0].id,
                        data[i],
                        None if writes[i][1] is None else {EXPECTED_LAST: str(writes[i][1])},
                    )
                    for i in todo
                ],
                timeout=JS_PUBLISH_TIMEOUT,
            )
            retry: list[int] = []
            failure: Exception = nats.errors.TimeoutError()
            for i, ack in zip(todo, acks, strict=True):
                try:
                    ack.raise_for()
                except TRANSIENT as exc:
                    retry.append(i)
                    failure = exc
                    continue
                except nats.js.errors.APIError as exc:
                    if exc.err_code not in WRONG_LAST_SEQUENCE:
                        raise
                    conflicts.append(i)
                    continue
                revisions[i] = ack.seq
                if on_saved is not None:
                    on_saved(writes[i][0].id, ack.seq)
            if retry:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise failure
                log.warning("bus.retry", error=type(failure).__name__, records=len(retry))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            todo = retry
        for i in conflicts:
            # our own write whose acknowledgement was lost (then retried) is no conflict
            job = writes[i][0]
            entry = await again(functools.partial(self.get_value, subjects.JOBS_BUCKET, job.id))
            if entry is None or entry[0] != data[i]:
                raise Fenced(
                    f"job {job.id} was written by someone else since revision {writes[i][1]}: "
                    "another requester is active"
                )
            revisions[i] = entry[1]
            if on_saved is not None:
                on_saved(job.id, entry[1])
        return revisions

    async def put_value(self, bucket: str, key: str, value: bytes) -> int:
        """Put ``value`` under ``key`` in ``bucket`` (as ``KeyValue.put``); its revision."""
        ack = await self.acks.publish(
            f"$KV.{bucket}.{key}", value, None, timeout=JS_PUBLISH_TIMEOUT
        )
        ack.raise_for()
        return ack.seq

    async def job_ids(self) -> list[str]:
        """Every key of the jobs bucket (a deleted one too: ``load_job`` gives None for it)."""
        return await again(functools.partial(self.kv_keys, subjects.JOBS_BUCKET))

    async def kv_keys(self, bucket: str) -> list[str]:
        """Every key ``bucket`` holds a message for: its last value, or the marker of its
        deletion (a get of that key finds nothing). The stream's info with its subjects, in
        pages of up to 100,000: a request each, answered or timed out, 8x quicker than
        ``KeyValue.keys()`` at 100,000 keys, which watches the bucket until the last entry
        arrives (and may wait forever when entries expire meanwhile, as leases do)."""
        prefix = f"$KV.{bucket}."
        keys: list[str] = []
        while True:
            answer = await self._js_api(
                f"$JS.API.STREAM.INFO.KV_{bucket}",
                {"subjects_filter": f"{prefix}>", "offset": len(keys)},
                KV_KEYS_TIMEOUT,
            )
            assert answer is not None  # noqa: S101 (no error is ``absent`` here)
            page = (answer.get("state") or {}).get("subjects") or {}
            keys += [subject[len(prefix) :] for subject in page if subject.startswith(prefix)]
            if not page or len(keys) >= int(answer.get("total") or 0):
                return keys


@dataclass(frozen=True)
class DeadLetter:
    """A message a consumer gave up on, as kept in BACQ_DEAD."""

    seq: int
    at: dt.datetime | None
    consumer: str
    subject: str
    reason: str
    data: bytes


def _events_message(events: list[Event]) -> tuple[str, bytes, str]:
    """One commit's events as (subject, data, Nats-Msg-Id): a retry is stored once."""
    first, last = events[0], events[-1]
    msg_id = f"ev.{first.job_id}.{first.seq}" + (f"-{last.seq}" if last.seq != first.seq else "")
    return subjects.events(first.job_id), encode_events(events), msg_id


def new_nonce() -> str:
    """An id part nobody else can guess (128 random bits): message ids built from it cannot be
    taken first by someone else to make JetStream drop the real message as a duplicate."""
    return secrets.token_hex(16)


def last_delivery(msg: Msg) -> bool:
    """True when ``msg`` will not be delivered again if it is not acked now."""
    try:
        return msg.metadata.num_delivered >= subjects.MAX_DELIVER
    except (AttributeError, ValueError, nats.errors.Error):
        return True


def _role(name: str) -> str:
    """``bacq-worker-w1`` → worker; every other name (bacq-client, bacq-doctor, …) → client."""
    parts = name.split("-")
    role = parts[1] if len(parts) > 1 and parts[0] == "bacq" else "client"
    return role if role in ("requester", "verifier", "worker") else "client"


def replicas() -> int:
    """JetStream replicas for the streams and buckets (``bacq.streams.replicas``)."""
    return streams.replicas()


async def ensure_bucket(js: JetStreamContext, name: str) -> KeyValue:
    """The key-value bucket ``name`` of the table in ``bacq.streams``, created when missing."""
    return await streams.ensure_bucket(js, name)


async def again(call: Callable[[], Awaitable[T]], *, retry_for: float = JS_RETRY_FOR) -> T:
    """``call()``, asked again while JetStream is briefly away (a restart, a failover)."""
    deadline = asyncio.get_running_loop().time() + retry_for
    delay = 0.2
    while True:
        try:
            return await call()
        except TRANSIENT as exc:
            if asyncio.get_running_loop().time() + delay > deadline:
                raise
            log.warning("bus.retry", error=type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
