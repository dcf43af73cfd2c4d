"""Who is the active requester (or verifier): a lease in a JetStream key-value bucket.

Touches NATS only: the bucket ``bacq-leases`` (key = role, value = a ``LeaseHolder``), whose
entries expire ``LEASE_TTL`` seconds after their last write. Any number of instances of a role may
run; the one that holds the lease acts, the others wait (``acquire``) and take over within
``LEASE_TTL`` + ``RENEW_EVERY`` seconds when the holder dies or is cut off. The holder renews with
a compare-and-set on the entry's revision; when a renewal finds another holder, or cannot be made
for ``LEASE_TTL`` seconds, the lease is lost and ``lost`` is set: the service stops (its
supervisor starts it again, as a standby). A deposed holder that comes back cannot undo the new
holder's work either: every job record write is a compare-and-set too (``bacq.bus``).

The holder renews from a thread of its own, on a NATS connection of its own: a service whose event
loop is busy for seconds (a flood of submissions on a loaded machine) is still alive and must not
lose its lease for that; a frozen or cut-off process stops renewing and loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Callable

import nats
import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from bacq import subjects
from bacq.bus import MAX_OUTSTANDING_PINGS, PING_INTERVAL, Bus, replicas
from bacq.log import get_logger
from bacq.models import decode, encode, now

__all__ = ["LEASE_TTL", "Lease", "LeaseHolder", "read_leases"]

LEASE_TTL = 4.0  # seconds a lease lives without renewal
RENEW_EVERY = 1.0  # seconds between renewals (and between a standby's tries)
ROLES = ("requester", "verifier")  # the roles that hold a lease
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
    # one get per role (each a request with a timeout), not bucket.keys(): that watches the
    # bucket until the last entry arrives, and these entries expire while it waits
    for role in ROLES:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError, ValueError):
            entry = await bucket.get(role)
            if entry.value:
                holders[role] = decode(LeaseHolder, entry.value)
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
        self._renewer: threading.Thread | None = None
        self._stop_renewing = threading.Event()
        self._last_ok = 0.0  # monotonic time of the last successful write of the lease

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
        """True when this process may act now: its lease is fresh, or the renewing thread
        renews it (or takes it back) within ``LEASE_TTL`` more seconds. False, and ``lost``
        set, otherwise."""
        if self.valid():
            return True
        deadline = time.monotonic() + LEASE_TTL
        while not self.lost.is_set() and self._revision and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if self.valid():
                return True
        if not self.lost.is_set():
            log.error("lease.lost", role=self.role, instance=self.holder.instance, reason="stale")
            self.lost.set()
        return False

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
                self._start_renewing()
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

    def _start_renewing(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop_renewing = threading.Event()
        self._renewer = threading.Thread(
            target=lambda: asyncio.run(self._renew(loop)), name=f"lease-{self.role}", daemon=True
        )
        self._renewer.start()

    async def _renew(self, owner: asyncio.AbstractEventLoop) -> None:
        """(In the renewing thread, on its own loop and connection.) Renew every
        ``RENEW_EVERY`` seconds until stopped; on loss set ``lost`` in the owner's loop."""
        why = "stopped"
        nc = None
        try:
            bus = self.bus
            nc = await asyncio.wait_for(
                nats.connect(
                    bus.servers,
                    name=f"{bus.name}-lease",
                    connect_timeout=min(RENEW_EVERY, 2.0),
                    # a server that went silent (cut off) is left as soon as the main
                    # connection leaves it (bacq.bus)
                    ping_interval=PING_INTERVAL,
                    max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    **bus.options.connect_kwargs(),
                ),
                timeout=LEASE_TTL - RENEW_EVERY,
            )
            bucket = await nc.jetstream().key_value(subjects.LEASES_BUCKET)
            while not self._stop_renewing.is_set():
                await asyncio.sleep(RENEW_EVERY)
                if self._stop_renewing.is_set():
                    return
                try:
                    self.holder.renewed = now()
                    self._revision = await asyncio.wait_for(
                        bucket.update(self.role, encode(self.holder), last=self._revision),
                        timeout=LEASE_TTL,
                    )
                    self._last_ok = time.monotonic()
                    continue
                except nats.js.errors.KeyWrongLastSequenceError:
                    if await self._take_back(bucket):
                        continue
                    why = "another instance holds it now"
                except (nats.errors.Error, TimeoutError) as exc:
                    if time.monotonic() - self._last_ok < LEASE_TTL:
                        log.warning("lease.renew_failed", role=self.role, error=type(exc).__name__)
                        continue
                    why = f"not renewed for {LEASE_TTL:g}s ({type(exc).__name__})"
                break
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            why = f"the renewing connection failed ({type(exc).__name__})"
        finally:
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
        if self._stop_renewing.is_set():
            return
        log.error("lease.lost", role=self.role, instance=self.holder.instance, reason=why)
        with contextlib.suppress(RuntimeError):  # the owner's loop is closed: nothing to tell
            owner.call_soon_threadsafe(self.lost.set)

    async def _take_back(self, bucket: KeyValue) -> bool:
        """(In the renewing thread.) A renewal found another revision: when the entry is still
        this instance's (an earlier renewal was applied, its answer lost), go on from its
        revision; when it expired and nobody took it (this process stood still for longer
        than ``LEASE_TTL``, in a long garbage collection, say), take it again. False when
        another instance holds it."""
        try:
            entry = await bucket.get(self.role)
            holder = decode(LeaseHolder, entry.value) if entry.value else None
        except nats.js.errors.KeyNotFoundError:
            holder = None
        except (nats.errors.Error, TimeoutError, ValueError):
            return False
        if holder is not None:
            if holder.instance != self.holder.instance:
                return False
            self._revision = entry.revision or self._revision
            log.warning("lease.revision_adopted", role=self.role, instance=self.holder.instance)
            return True
        try:
            self.holder.renewed = now()
            self._revision = await bucket.create(self.role, encode(self.holder))
        except (nats.errors.Error, TimeoutError):
            return False
        self._last_ok = time.monotonic()
        log.warning("lease.taken_back", role=self.role, instance=self.holder.instance)
        return True

    async def release(self) -> None:
        """Give the lease up at once (a clean stop), so that a standby need not wait."""
        if self._renewer is not None:
            self._stop_renewing.set()
            await asyncio.to_thread(self._renewer.join, RENEW_EVERY + LEASE_TTL)
        if self._bucket is not None and not self.lost.is_set() and self._revision:
            with contextlib.suppress(nats.errors.Error, TimeoutError, nats.js.errors.APIError):
                await self._bucket.delete(self.role, last=self._revision)
