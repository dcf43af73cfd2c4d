"""Each node's durable record of conduct, and the quarantine that follows from it.

Touches NATS only: the key-value bucket ``bacq-reputation`` (key = node id, value = a
``bacq.models.Reputation``), written by the requester and the verifier, read by ``bacq nodes``.
Counts are added in memory as offences happen (a flood of 5,000 malformed messages must not be
5,000 writes) and flushed about once a second with a compare-and-set per node, so the two writers
never lose each other's counts.

A node is quarantined (not invited, shown with the reason in ``bacq nodes``) when, since its last
release, it sent ``offences_limit`` forged or malformed messages or bad reveals, or had
``rejected_limit`` results outvoted while fewer of its results were verified. ``bacq nodes
release NODE`` lifts it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from bacq import subjects
from bacq.bus import Bus, ensure_bucket
from bacq.log import get_logger
from bacq.models import ReleaseReply, ReleaseRequest, Reputation, decode, encode, now

__all__ = [
    "KINDS",
    "OFFENCES",
    "QuarantinePolicy",
    "Reputations",
    "read_reputations",
    "release_node",
    "reputation_bucket",
]

KINDS = ("verified", "rejected", "failed", "forged", "malformed", "bad_reveals")
OFFENCES = ("forged", "malformed", "bad_reveals")
FLUSH_EVERY = 1.0  # seconds between writes of the counted offences
log = get_logger("bacq.reputation")


@dataclass(frozen=True)
class QuarantinePolicy:
    offences_limit: int = 10  # forged + malformed + bad reveals since the last release
    rejected_limit: int = 5  # outvoted results, when they outnumber the verified ones

    def why(self, record: Reputation) -> str | None:
        """The reason ``record`` calls for quarantine, or None."""
        offences = record.offences - record.offences_at_release
        if offences >= self.offences_limit:
            return (
                f"{offences} forged or malformed messages or bad reveals "
                f"(limit {self.offences_limit}): forged {record.forged}, malformed "
                f"{record.malformed}, bad reveals {record.bad_reveals}"
            )
        if record.rejected >= self.rejected_limit and record.rejected > record.verified:
            return (
                f"{record.rejected} results outvoted, {record.verified} verified "
                f"(limit {self.rejected_limit})"
            )
        return None


async def reputation_bucket(bus: Bus) -> KeyValue:
    return await ensure_bucket(bus.js, subjects.REPUTATION_BUCKET)


async def read_reputations(bus: Bus) -> dict[str, Reputation]:
    """Every node's record (for ``bacq nodes``)."""
    reputations = Reputations(await reputation_bucket(bus))
    await reputations.load_all(bus)
    return reputations.records()


async def release_node(bus: Bus, node_id: str, *, timeout: float = 10.0) -> ReleaseReply:
    """Ask the requester to lift ``node_id``'s quarantine (``bacq nodes release``)."""
    return await bus.request(
        subjects.RELEASE, ReleaseRequest(node_id=node_id), ReleaseReply, timeout=timeout
    )


class Reputations:
    """Counts offences and results per node and keeps the records in the bucket."""

    def __init__(self, bucket: KeyValue | None, policy: QuarantinePolicy | None = None) -> None:
        self.bucket = bucket
        self.policy = policy or QuarantinePolicy()
        self._pending: dict[str, Counter[str]] = {}
        self._records: dict[str, Reputation] = {}  # the latest seen of each node
        self._releases: set[str] = set()
        self.counted: Counter[str] = Counter()  # every count since start, by kind (metrics)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, bus: Bus, policy: QuarantinePolicy | None = None) -> Reputations:
        return cls(await reputation_bucket(bus), policy)

    def count(self, node_id: str, kind: str, n: int = 1) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown reputation count {kind!r}")
        if not subjects.is_token(node_id):
            return  # no record can be kept under that name (it came from a subject, so rare)
        self._pending.setdefault(node_id, Counter())[kind] += n
        self.counted[kind] += n

    def offences(self) -> dict[str, int]:
        """Offences counted since this process started, by kind (for the metrics)."""
        return {kind: self.counted[kind] for kind in OFFENCES}

    def quarantined(self, node_id: str) -> str | None:
        record = self._records.get(node_id)
        return None if record is None else record.quarantined

    def release(self, node_id: str) -> None:
        self._releases.add(node_id)
        record = self._records.get(node_id)
        if record is not None:  # not invited from now on, even before the flush
            self._records[node_id] = record.model_copy(update={"quarantined": None})

    def records(self) -> dict[str, Reputation]:
        return dict(self._records)

    async def load_all(self, bus: Bus) -> None:
        """Read every record (at start, so quarantines hold across restarts)."""
        if self.bucket is None:
            return
        for key in await bus.kv_keys(subjects.REPUTATION_BUCKET):
            with contextlib.suppress(nats.js.errors.KeyNotFoundError, ValueError):
                entry = await self.bucket.get(key)
                if entry.value:
                    self._records[key] = decode(Reputation, entry.value)

    async def flush(self) -> None:
        if self.bucket is None:
            return
        pending, self._pending = self._pending, {}
        releases, self._releases = self._releases, set()
        for node_id in set(pending) | releases:
            try:
                await self._apply(node_id, pending.get(node_id, Counter()), node_id in releases)
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("reputation.flush_failed", node=node_id, error=type(exc).__name__)
                merged = self._pending.setdefault(node_id, Counter())
                merged.update(pending.get(node_id, Counter()))
                if node_id in releases:
                    self._releases.add(node_id)

    async def _apply(self, node_id: str, counts: Counter[str], release: bool) -> None:
        assert self.bucket is not None  # noqa: S101 (flush checked)
        for _ in range(10):  # compare-and-set: the other writer may have written meanwhile
            try:
                entry = await self.bucket.get(node_id)
                record = (
                    decode(Reputation, entry.value) if entry.value else Reputation(node_id=node_id)
                )
                revision: int | None = entry.revision
            except nats.js.errors.KeyNotFoundError:
                record, revision = Reputation(node_id=node_id), None
            for kind, n in counts.items():
                setattr(record, kind, getattr(record, kind) + n)
            if release:
                record.quarantined, record.quarantined_at = None, None
                record.released_at = now()
                record.offences_at_release = record.offences
                record.rejected = min(record.rejected, record.verified)
            elif record.quarantined is None:
                why = self.policy.why(record)
                if why is not None:
                    record.quarantined, record.quarantined_at = why, now()
                    log.warning("node.quarantined", node=node_id, reason=why)
            record.updated_at = now()
            try:
                if revision is None:
                    await self.bucket.create(node_id, encode(record))
                else:
                    await self.bucket.update(node_id, encode(record), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            self._records[node_id] = record
            return
        log.warning("reputation.contended", node=node_id)

    async def run(self) -> None:
        """Flush about once a second, forever (cancel to stop)."""
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="reputation")

    async def stop(self, *, timeout: float | None = None) -> None:
        """Stop the periodic flush and flush what is left, within ``timeout`` seconds if given
        (counts not written then are lost with this process, as on a crash)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await self.flush()
