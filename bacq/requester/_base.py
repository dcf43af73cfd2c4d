"""What every part of the requester shares: its settings, its in-memory state and small helpers.

Touches nothing itself; the parts (``ledger``, ``dispatch``, ``watchdog``, ``folding``, ``intake``)
build on ``Core`` in that order and ``bacq.requester.service.Requester`` puts them together.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from bacq.bus import Bus
from bacq.events import Event
from bacq.lease import Lease
from bacq.log import get_logger
from bacq.models import (
    Bid,
    JobRecord,
    NodeInfo,
)
from bacq.reputation import QuarantinePolicy, Reputations
from bacq.requester.operators import NODES_CONFIG_ENV, load_operator_config
from bacq.requester.record import move_exec
from bacq.signing import load_signer
from bacq.spec import JobSpec, Resources
from bacq.states import ExecState, JobState

ASSIGN_TIMEOUT = 5.0  # seconds a chosen worker has to confirm an assignment
REANNOUNCE_EVERY = 2.0  # seconds between announcements while bids are missing
WATCH_EVERY = 1.0  # seconds between deadline checks
FOLD_IN_FLIGHT = 256  # progress messages and verdicts being folded at once
QUICK_BIDS = 0.05  # seconds within which bids count as quick (see drive)
MAX_NODE_MESSAGE = 64 * 1024  # bytes of a bid, heartbeat or progress message from a worker
M = TypeVar("M", bound=BaseModel)
LISTEN_FIRST = 2.5  # seconds to hear worker heartbeats after a start before queued jobs go out


@dataclass(frozen=True, kw_only=True)
class RequesterConfig:
    result_grace: float = 120.0  # beyond the job's timeout: inputs, image, publishing
    lost_after: float = 10.0  # seconds without a heartbeat before a worker is lost
    # seconds from the last answer to the verdict: past the verifier's own deadline for reveals
    # (bacq.verify REVEAL_TIMEOUT, 60 s) with room for a verifier failover or two, or a job
    # whose worker was cut off while asked to reveal fails here before the verifier decides
    verify_timeout: float = 180.0
    events_max_age: float = 365 * 24 * 3600.0
    events_max_bytes: int = 10 * 1024**3
    nodes_config: str | None = None  # operators and capacity caps per node (operators.py)
    signing_key: str | None = None  # the seed file that signs events (bacq.signing; created)
    offences_limit: int = 10  # forged/malformed messages and bad reveals before quarantine
    rejected_limit: int = 5  # outvoted results (more than verified) before quarantine


# one job's commit: its record, its new events, the hash they chain to
Commit = tuple[JobRecord, list[Event], str]
# one change of a job record (True when it changed it), and who caused it
Step = tuple[Callable[[JobRecord], bool], str]


@dataclass
class Load:
    """What the requester has put on one worker: executions ("run", job) and invitations to bid
    ("bid", job), with their cpu and memory summed as they come and go."""

    held: dict[tuple[str, str], Resources] = field(default_factory=dict)
    cpu: float = 0.0
    memory: int = 0

    def add(self, key: tuple[str, str], resources: Resources) -> None:
        if key not in self.held:
            self.held[key] = resources
            self.cpu += resources.cpu
            self.memory += resources.memory

    def remove(self, key: tuple[str, str]) -> None:
        resources = self.held.pop(key, None)
        if resources is not None:
            self.cpu -= resources.cpu
            self.memory -= resources.memory


def record_bids(job: JobRecord, *, bids: list[Bid]) -> bool:
    if job.final:  # ended (cancelled) while bidding
        return False
    changed = False
    for bid in bids:
        changed |= move_exec(job, bid.node_id, ExecState.BID, detail="bid")
    return changed


def selected(node: NodeInfo, spec: JobSpec) -> bool:
    """True when ``node`` has every label the job's node_selector asks for."""
    return all(node.labels.get(k) == v for k, v in spec.node_selector.items())


def copy_record(job: JobRecord) -> JobRecord:
    """A copy the record functions may change: its own executions, the rest shared (a change
    replaces scalar fields and executions; the spec is never changed). Far cheaper than a deep
    copy, which was a tenth of the requester's time."""
    return job.model_copy(
        update={"executions": {k: e.model_copy() for k, e in job.executions.items()}}
    )


def idempotency_slot(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:40]


class Core:
    """The requester's state, shared by its parts."""

    def __init__(self, bus: Bus, config: RequesterConfig | None = None) -> None:
        self.bus = bus
        self.config = config or RequesterConfig()
        self.log = get_logger("bacq.requester")
        self._locks: dict[str, asyncio.Lock] = {}
        self._bids: dict[str, list[Bid]] = {}
        self._bid_arrived: dict[str, asyncio.Event] = {}
        # job → operators whose bids are refused at once (they hold an execution of it already)
        self._excluded: dict[str, set[str]] = {}
        self._invited: dict[str, set[str]] = {}  # job in bidding → the nodes invited to bid
        self.operators = load_operator_config(
            self.config.nodes_config or os.environ.get(NODES_CONFIG_ENV) or None
        )
        # fencing: the lease this requester holds (serve() acquires it), the revision of each
        # record it last wrote or read, and whether another requester took over
        self.lease: Lease | None = None
        self._revisions: dict[str, int] = {}
        # job → the stream sequence of its last events message (each commit's events are
        # stored only after that one: a deposed requester's late events are refused)
        self._last_events: dict[str, int] = {}
        self._states: dict[str, JobState] = {}  # the state each unfinished job is counted in
        self._answers: Any = None  # the bucket of known answers (answers.py), opened in serve()
        self.fenced = asyncio.Event()
        # signs every event (bacq.signing): the key file is read, or made, at once
        self.signer = load_signer(
            Path(self.config.signing_key) if self.config.signing_key else None
        )
        # each node's record; its bucket is opened in serve()
        self.reputations = Reputations(
            None,
            QuarantinePolicy(
                offences_limit=self.config.offences_limit,
                rejected_limit=self.config.rejected_limit,
            ),
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._nodes: dict[str, tuple[NodeInfo, float]] = {}  # node → (info, monotonic seen)
        self._started = time.monotonic()
        self._retrying: set[tuple[str, str]] = set()
        self._idempotency: Any = None
        # the single writer's copy of every unfinished job (watched for deadlines and lost
        # workers); records are changed only through ``mutate``, on a copy, committed first
        self._records: dict[str, JobRecord] = {}
        # what the watchdog looks at each second, so that it need not read every record: the
        # jobs running or being verified, and when each queued job's queue_timeout ends (a
        # heap; an entry whose job has moved on is dropped when its time comes)
        self._watched: set[str] = set()
        self._queue_ends: list[tuple[dt.datetime, str]] = []
        self._queue: deque[str] = deque()  # pending jobs waiting for free worker slots, FIFO
        self._wake = asyncio.Event()  # the dispatcher looks at the queue again
        self._bidding: dict[str, list[str]] = {}  # job in bidding → the workers it invited
        self._loads: dict[str, Load] = {}  # node → what it runs and was invited to bid for
        # commits waiting for the ledger's next write (a group commit), and the task writing
        self._commit_queue: list[tuple[Sequence[Commit], asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None

    # -- records and events -----------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
