"""Every JetStream stream and key-value bucket bacq uses, declared in one table.

Touches NATS (the JetStream API) only when ``ensure_*`` is called; the table itself is data. Names
come from ``bacq.subjects``. Every role declares through here (the requester and the verifier
declare them all when they connect, see ``bacq.bus.Bus.connect``), so that one setting, e.g. the
number of copies in a cluster (``$BACQ_JS_REPLICAS``), applies to every stream and bucket alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue

from bacq import subjects
from bacq.errors import ConfigError

__all__ = [
    "BUCKETS",
    "REPLICAS_ENV",
    "STREAMS",
    "BucketDecl",
    "StreamDecl",
    "bucket_config",
    "ensure_all",
    "ensure_bucket",
    "ensure_stream",
    "replicas",
    "stream_config",
]

# copies of every stream and bucket in a JetStream cluster (3 for the documented 3-server cluster)
REPLICAS_ENV = "BACQ_JS_REPLICAS"
DUPLICATE_WINDOW = 120.0  # seconds within which a repeated Nats-Msg-Id is dropped
DAY = 24 * 3600.0
DECLARE_RETRY_FOR = 60.0  # seconds a declaration is retried while the cluster is not ready yet
# a JetStream that is starting, electing a leader or placing replicas answers late or not at all
_NOT_READY = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)
T = TypeVar("T")
LOGS_CHUNK_BYTES = 16 * 1024  # bacq.logs.CHUNK_BYTES: at most this much output per message
LEASE_TTL = 4.0  # bacq.lease.LEASE_TTL: seconds a lease lives without renewal


def replicas() -> int:
    """JetStream replicas for streams and buckets: ``$BACQ_JS_REPLICAS`` (1 to 5), else 1."""
    value = os.environ.get(REPLICAS_ENV, "1")
    if not value.isdigit() or not 1 <= int(value) <= 5:
        raise ConfigError(f"{REPLICAS_ENV} must be a number from 1 to 5, not {value!r}")
    return int(value)


@dataclass(frozen=True)
class StreamDecl:
    """A stream. ``update``: an existing stream is brought to this config (e.g. new replicas);
    otherwise it is only created when missing (its retention is someone else's setting)."""

    name: str
    subjects: tuple[str, ...]
    max_age: float
    max_bytes: int = -1
    max_msg_size: int = -1
    discard: DiscardPolicy = DiscardPolicy.OLD
    update: bool = True


@dataclass(frozen=True)
class BucketDecl:
    """A key-value bucket (file storage); ``ttl`` 0 keeps keys until they are overwritten."""

    name: str
    history: int = 5
    ttl: float = 0.0


STREAMS: dict[str, StreamDecl] = {
    decl.name: decl
    for decl in (
        # progress, results, verdicts: nothing here may be lost
        StreamDecl(subjects.STREAM, tuple(subjects.STREAM_SUBJECTS), max_age=30 * DAY),
        # verdicts: only the verifier writes here (workers cannot)
        StreamDecl(subjects.VERDICTS_STREAM, (subjects.VERDICT_ALL,), max_age=30 * DAY),
        # what a consumer gave up on, with the reason (bacq events --dead-letters)
        StreamDecl(
            subjects.DEAD_STREAM, (subjects.DEAD_ALL,), max_age=30 * DAY, max_bytes=256 * 1024**2
        ),
        # job histories; the requester sets the retention from its flags (set_events_retention)
        StreamDecl(
            subjects.EVENTS_STREAM,
            (subjects.EVENTS_ALL,),
            max_age=365 * DAY,
            max_bytes=10 * 1024**3,
            update=False,
        ),
        # live output of running jobs: a window, bounded in size and age
        StreamDecl(
            subjects.LOGS_STREAM,
            (subjects.LOGS_ALL,),
            max_age=DAY,
            max_bytes=256 * 1024**2,
            max_msg_size=8 * LOGS_CHUNK_BYTES,  # JSON escapes may grow a chunk up to 6 times
        ),
    )
}

BUCKETS: dict[str, BucketDecl] = {
    decl.name: decl
    for decl in (
        BucketDecl(subjects.JOBS_BUCKET),  # job records: the requester writes them
        BucketDecl(subjects.RESULTS_BUCKET),  # what the verifier has collected per job
        BucketDecl(subjects.IDEMPOTENCY_BUCKET),  # client idempotency key → job id
        BucketDecl(subjects.NODES_BUCKET, history=1, ttl=7 * DAY),  # latest heartbeat per node
        BucketDecl(subjects.REPUTATION_BUCKET),  # per-node record, quarantines (bacq.reputation)
        BucketDecl(subjects.ANSWERS_BUCKET),  # a deterministic job's answer key → accepted job
        # the active requester and verifier; a lease lives LEASE_TTL (bacq.lease) unrenewed
        BucketDecl(subjects.LEASES_BUCKET, history=1, ttl=LEASE_TTL),
        BucketDecl(subjects.KEYS_BUCKET),  # the requester's public signing keys (bacq.signing)
    )
}


def stream_config(name: str) -> StreamConfig:
    """The config of stream ``name`` from the table, with the current replicas."""
    try:
        decl = STREAMS[name]
    except KeyError:
        raise ValueError(f"{name!r} is not a stream of bacq.streams.STREAMS") from None
    return StreamConfig(
        name=decl.name,
        subjects=list(decl.subjects),
        storage=StorageType.FILE,
        max_age=decl.max_age,
        max_bytes=decl.max_bytes,
        max_msg_size=decl.max_msg_size,
        discard=decl.discard,
        duplicate_window=DUPLICATE_WINDOW,
        num_replicas=replicas(),
    )


def bucket_config(name: str) -> KeyValueConfig:
    """The config of bucket ``name`` from the table, with the current replicas."""
    try:
        decl = BUCKETS[name]
    except KeyError:
        raise ValueError(f"{name!r} is not a bucket of bacq.streams.BUCKETS") from None
    return KeyValueConfig(
        bucket=decl.name,
        history=decl.history,
        ttl=decl.ttl or None,
        storage=StorageType.FILE,
        replicas=replicas(),
    )


async def _retry(call: Callable[[], Awaitable[T]], also: tuple[type[Exception], ...] = ()) -> T:
    """``call()``, again while JetStream is not ready (a cluster placing three replicas on a
    busy machine can take longer than one request's timeout), or on one of ``also``."""
    deadline = asyncio.get_running_loop().time() + DECLARE_RETRY_FOR
    delay = 0.5
    retried: tuple[type[Exception], ...] = (*_NOT_READY, *also)
    while True:
        try:
            return await call()
        except retried:
            if asyncio.get_running_loop().time() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def ensure_stream(js: JetStreamContext, name: str, *, update: bool = False) -> None:
    """Create stream ``name`` when missing. With ``update`` (the declaring roles, through
    ``ensure_all``), an existing stream whose table entry says so is brought to its config (e.g.
    new replicas); readers never update (a client may not)."""
    config = stream_config(name)

    async def declare() -> None:
        try:
            await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # created concurrently
                await js.add_stream(config)
            return
        if update and STREAMS[name].update:
            await js.update_stream(config)

    await _retry(declare)


async def ensure_bucket(js: JetStreamContext, name: str) -> KeyValue:
    """The key-value bucket ``name``, created from the table when missing."""
    config = bucket_config(name)

    async def declare() -> KeyValue:
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # created concurrently
                await js.create_key_value(config)
            return await js.key_value(name)

    # made by another process a moment ago: a cluster may not show it yet
    return await _retry(declare, also=(nats.js.errors.BucketNotFoundError,))


async def _has_leader(js: JetStreamContext, stream: str) -> None:
    """Return once ``stream`` answers through a leader (at once without a cluster)."""
    deadline = asyncio.get_running_loop().time() + DECLARE_RETRY_FOR
    while True:
        info = await _retry(lambda: js.stream_info(stream))
        if info.cluster is None or info.cluster.leader:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise nats.errors.TimeoutError
        await asyncio.sleep(0.2)


async def ensure_all(js: JetStreamContext) -> None:
    """Declare every stream and bucket of the table (the requester and the verifier do), and
    return once each has a leader: a replicated stream just made may not answer reads yet."""
    for name in STREAMS:
        await ensure_stream(js, name, update=True)
    for name in BUCKETS:
        await ensure_bucket(js, name)
    for stream in [*STREAMS, *(f"KV_{b}" for b in BUCKETS)]:
        await _has_leader(js, stream)
