"""Live stdout/stderr of running jobs: the worker streams it, ``bacq logs`` reads it.

Touches NATS only: the JetStream stream ``BACQ_LOGS`` (subjects ``bacq.logs.<job>.<node>``, see
``bacq.subjects``). The worker side (``LogStreamer``) is fed raw bytes by the container's log
follower threads and publishes them in chunks, bounded in rate (one message per stream every
``interval`` seconds, each at most ``CHUNK_BYTES``) and in size (``MAX_BYTES`` per stream and
execution, then one notice that the rest is in the results). The stream itself keeps
``STREAM_MAX_BYTES`` at most, for ``STREAM_MAX_AGE`` seconds. The authoritative output is always
the ``stdout``/``stderr`` files of the results in IPFS; this is only a window onto a running job.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from collections.abc import AsyncIterator
from typing import Literal

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
)
from pydantic import BaseModel, ConfigDict

from bacq import streams, subjects
from bacq.bus import Bus
from bacq.log import get_logger

__all__ = [
    "CHUNK_BYTES",
    "MAX_BYTES",
    "LogChunk",
    "LogStreamer",
    "ensure_logs_stream",
    "read_logs",
]

CHUNK_BYTES = streams.LOGS_CHUNK_BYTES  # at most this much output per message
MAX_BYTES = 1024 * 1024  # per stream (stdout, stderr) and execution; the rest is in the results
PENDING_BYTES = 256 * 1024  # output waiting to be sent beyond this is skipped (and said so)
INTERVAL = 0.25  # seconds between two messages of one stream: at most 8 messages/s per execution
STREAM_MAX_BYTES = streams.STREAMS[subjects.LOGS_STREAM].max_bytes
STREAM_MAX_AGE = streams.STREAMS[subjects.LOGS_STREAM].max_age

Stream = Literal["stdout", "stderr"]
log = get_logger("bacq.logs")


class LogChunk(BaseModel):
    """A piece of a running container's output (published on ``bacq.logs.<job>.<node>``)."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    node_id: str
    stream: Stream
    seq: int
    text: str = ""
    skipped: int = 0  # bytes left out before this text (the rate or size bound was hit)
    eof: bool = False  # the container's output on this stream ended


async def ensure_logs_stream(js: JetStreamContext) -> None:
    """Declare the ``BACQ_LOGS`` stream from the table in ``bacq.streams`` (idempotent)."""
    await streams.ensure_stream(js, subjects.LOGS_STREAM)


class _Pending:
    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buffer = bytearray()
        self.sent = 0
        self.skipped = 0
        self.seq = 0
        self.capped = False
        self.ended = False


class LogStreamer:
    """Publishes one execution's output. ``feed`` may be called from any thread."""

    def __init__(
        self,
        bus: Bus,
        job_id: str,
        node_id: str,
        *,
        interval: float = INTERVAL,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.bus = bus
        self.job_id = job_id
        self.node_id = node_id
        self.subject = subjects.logs(job_id, node_id)
        self.interval = interval
        self.max_bytes = max_bytes
        self._streams: dict[Stream, _Pending] = {"stdout": _Pending(), "stderr": _Pending()}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name=f"logs-{self.job_id}")

    def feed(self, stream: str, data: bytes) -> None:
        """Hand over ``stdout``/``stderr`` output; thread-safe, never blocks, never raises."""
        if stream not in ("stdout", "stderr"):
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._take, stream, data)

    def _take(self, stream: str, data: bytes) -> None:
        pending = self._streams["stdout" if stream == "stdout" else "stderr"]
        room = PENDING_BYTES - len(pending.buffer)
        if room < len(data):
            pending.skipped += len(data) - max(room, 0)
            data = data[: max(room, 0)]
        pending.buffer += data

    async def close(self, *, timeout: float = 10.0) -> None:
        """Send what is left and an end-of-output mark per stream (giving up after ``timeout``)."""
        self._closing.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:  # NATS is away: the job must not wait for its live output
                log.warning("logs.close_timeout", job=self.job_id)
            except Exception as exc:
                log.warning("logs.close_failed", job=self.job_id, error=str(exc))

    async def _run(self) -> None:
        # a job that prints nothing costs no message at all (not even the stream check), so the
        # worker's own progress messages are not delayed by this
        try:
            while True:
                closing = self._closing.is_set()
                for name, pending in self._streams.items():
                    await self._flush(name, pending, final=closing)
                if closing and all(not p.buffer for p in self._streams.values()):
                    for name, pending in self._streams.items():
                        if pending.seq:
                            await self._send(name, pending, "", eof=True)
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), timeout=self.interval)
        except Exception as exc:  # live logs are a convenience: never disturb the job
            log.warning("logs.stream_failed", job=self.job_id, error=str(exc))

    async def _flush(self, name: Stream, pending: _Pending, *, final: bool) -> None:
        if not pending.buffer and not pending.skipped:
            return
        if pending.capped:
            pending.skipped += len(pending.buffer)
            pending.buffer.clear()
            return
        size = min(CHUNK_BYTES, len(pending.buffer), self.max_bytes - pending.sent)
        data = bytes(pending.buffer[:size])
        del pending.buffer[:size]
        pending.sent += size
        text = pending.decoder.decode(data, final=final and not pending.buffer)
        if pending.sent >= self.max_bytes:
            pending.capped = True
            text += (
                f"\n[bacq: live output of {name} stops after {self.max_bytes} bytes; "
                f"the whole of it is in the results: bacq logs {self.job_id} once it ends]\n"
            )
        await self._send(name, pending, text)

    async def _send(self, name: Stream, pending: _Pending, text: str, *, eof: bool = False) -> None:
        pending.seq += 1
        chunk = LogChunk(
            job_id=self.job_id,
            node_id=self.node_id,
            stream=name,
            seq=pending.seq,
            text=text,
            skipped=pending.skipped,
            eof=eof,
        )
        pending.skipped = 0
        await self.bus.js.publish(
            self.subject,
            chunk.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"logs.{self.job_id}.{self.node_id}.{name}.{pending.seq}"},
            timeout=5.0,
        )


async def read_logs(
    bus: Bus, job_id: str, *, follow: asyncio.Event | None = None
) -> AsyncIterator[LogChunk]:
    """Yield the stored chunks of ``job_id`` (every node), oldest first.

    Without ``follow`` it stops once it has caught up. With it, it keeps waiting for new chunks
    until the event is set (the job ended), then yields what is still stored and stops.
    """
    await ensure_logs_stream(bus.js)
    subject = subjects.logs_of_job(job_id)
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=subject,
        inactive_threshold=60.0,
    )
    sub = await bus.js.pull_subscribe(subject, stream=subjects.LOGS_STREAM, config=config)
    try:
        while True:
            ending = follow is None or follow.is_set()  # sampled before the fetch: nothing lost
            try:
                msgs = await sub.fetch(64, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                if ending:
                    return
                continue
            pending = 0
            for msg in msgs:
                with contextlib.suppress(ValueError):
                    yield LogChunk.model_validate_json(msg.data)
                pending = msg.metadata.num_pending
            if ending and pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
