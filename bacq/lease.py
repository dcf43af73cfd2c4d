"""Who is the active requester (or verifier): a lease in a JetStream key-value bucket.

Touches NATS only: the bucket ``bacq-leases`` (key = role, value = a ``LeaseHolder``), whose
entries expire ``LEASE_TTL`` seconds after their last write. Any number of instances of a role may
run; the one that holds the lease acts, the others wait (``acquire``) and take over within
``LEASE_TTL`` + ``RENEW_EVERY`` seconds when the holder dies or is cut off. The holder renews with
a compare-and-set on the entry's revision; when a renewal finds another holder, or cannot be made
for ``LEASE_TTL`` seconds, the lease is lost and ``lost`` is set: the service stops (its
supervisor starts it again, as a standby). A deposed holder that comes back cannot undo the new
holder's work either: every job record write is a compare-and-set too (``bacq.bus``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from bacq import subjects
from bacq.bus import Bus, replicas
from bacq.log import get_logger
from bacq.models import decode, encode, now

__all__ = ["LEASE_TTL", "Lease", "LeaseHolder", "read_leases"]

LEASE_TTL = 4.0  # seconds a lease lives without renewal
RENEW_EVERY = 1.0  # seconds between renewals (and between a standby's tries)
log = get_logger("bacq.lease")


class LeaseHolder(BaseModel):
    role: str
    instance: str  # host:pid:random, unique per process
    host: str
    pid: int
    since: dt.datetime = Field(default_factory=now)
    renewed: dt.datetime = Field(default_factory=now)


async def leases_bucket(bus: Bus) -> KeyValue:
    try:
        return await bus.js.key_value(subjects.LEASES_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        with contextlib.suppress(nats.js.errors.BadRequestError):  # created concurrently
            await bus.js.create_key_value(
                KeyValueConfig(
                    bucket=subjects.LEASES_BUCKET,
                    history=1,
                    ttl=LEASE_TTL,
                    storage=StorageType.FILE,
                    replicas=replicas(),
                )
            )
        return await bus.js.key_value(subjects.LEASES_BUCKET)


async def read_leases(bus: Bus) -> dict[str, LeaseHolder]:
    """The current holder of each role's lease (for ``bacq nodes`` and ``bacq doctor``)."""
    bucket = await leases_bucket(bus)
    holders: dict[str, LeaseHolder] = {}
    try:
        keys = list(await bucket.keys())
    except nats.js.errors.NoKeysError:
        return holders
    for key in keys:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError, ValueError):
            entry = await bucket.get(key)
            if entry.value:
                holders[key] = decode(LeaseHolder, entry.value)
    return holders


class Lease:
    """One process's claim to be the active ``role``."""

    def __init__(self, bus: Bus, role: str) -> None:
        self.bus = bus
        self.role = role
        host = socket.gethostname()
        self.holder = LeaseHolder(
            role=role,
            instance=f"{host}:{os.getpid()}:{os.urandom(3).hex()}",
            host=host,
            pid=os.getpid(),
        )
        self.lost = asyncio.Event()
        self._bucket: KeyValue | None = None
        self._revision = 0
        self._task: asyncio.Task[None] | None = None
        self._last_ok = 0.0  # monotonic time of the last successful write of the lease
        self._renewing = asyncio.Lock()

    def valid(self) -> bool:
        """True while this process may act: it holds the lease and renewed it recently enough
        that no other instance can have taken it over (a process that was frozen, or cut off,
        for longer acts on nothing until a renewal succeeds)."""
        return (
            not self.lost.is_set()
            and self._revision > 0
            and time.monotonic() - self._last_ok < LEASE_TTL - RENEW_EVERY
        )

    async def ensure(self) -> bool:
        """True when this process may act now: its lease is fresh, or a renewal made now
        succeeds (a process whose event loop was busy for a few seconds is not deposed for
        that, as long as nobody took the lease meanwhile). False, and ``lost`` set, otherwise."""
        if self.valid():
            return True
        async with self._renewing:  # one renewal at a time: each needs the latest revision
            if self.valid():
                return True
            if self.lost.is_set() or self._bucket is None or not self._revision:
                return False
            self.holder.renewed = now()
            try:
                self._revision = await self._bucket.update(
                    self.role, encode(self.holder), last=self._revision
                )
            except (nats.errors.Error, TimeoutError):
                log.error("lease.lost", role=self.role, instance=self.holder.instance)
                self.lost.set()
                return False
            self._last_ok = time.monotonic()
            return True

    async def acquire(
        self, stop: asyncio.Event, on_standby: Callable[[], None] | None = None
    ) -> bool:
        """Wait until this process holds the lease (True), or ``stop`` is set (False);
        ``on_standby`` is called once if another instance holds it at first."""
        self._bucket = None
        announced = False
        while not stop.is_set():
            try:
                if self._bucket is None:  # (NATS may be away now: cut off, a server restarting)
                    self._bucket = await leases_bucket(self.bus)
                self._revision = await self._bucket.create(self.role, encode(self.holder))
                self._last_ok = time.monotonic()
                log.info("lease.acquired", role=self.role, instance=self.holder.instance)
                self._task = asyncio.create_task(self._renew(), name=f"lease-{self.role}")
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                if not announced:
                    holder = await self._current()
                    log.info(
                        "lease.standby",
                        role=self.role,
                        active=holder.instance if holder else "unknown",
                    )
                    announced = True
                    if on_standby is not None:
                        on_standby()
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("lease.try_failed", role=self.role, error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RENEW_EVERY)
        return False

    async def _current(self) -> LeaseHolder | None:
        assert self._bucket is not None  # noqa: S101 (acquire opened it)
        try:
            entry = await self._bucket.get(self.role)
        except (nats.js.errors.KeyNotFoundError, nats.errors.Error, TimeoutError):
            return None
        return decode(LeaseHolder, entry.value) if entry.value else None

    async def _renew(self) -> None:
        assert self._bucket is not None  # noqa: S101
        while True:
            await asyncio.sleep(RENEW_EVERY)
            try:
                async with self._renewing:
                    self.holder.renewed = now()
                    self._revision = await self._bucket.update(
                        self.role, encode(self.holder), last=self._revision
                    )
                    self._last_ok = time.monotonic()
                continue
            except nats.js.errors.KeyWrongLastSequenceError:
                why = "another instance holds it now"
            except (nats.errors.Error, TimeoutError) as exc:
                if time.monotonic() - self._last_ok < LEASE_TTL:
                    log.warning("lease.renew_failed", role=self.role, error=type(exc).__name__)
                    continue
                why = f"not renewed for {LEASE_TTL:g}s ({type(exc).__name__})"
            log.error("lease.lost", role=self.role, instance=self.holder.instance, reason=why)
            self.lost.set()
            return

    async def release(self) -> None:
        """Give the lease up at once (a clean stop), so that a standby need not wait."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._bucket is not None and not self.lost.is_set() and self._revision:
            with contextlib.suppress(nats.errors.Error, TimeoutError, nats.js.errors.APIError):
                await self._bucket.delete(self.role, last=self._revision)
