"""The worker: bids on jobs it can take, runs them in Docker over IPFS inputs, publishes results.

Touches NATS (announcements and invitations, bids, assignments, progress, results; live output
and its heartbeat record, see bacq.logs and bacq.nodes), its kubo node, the Docker daemon and its
own work directory. Capacity (cpu, memory, job slots) is reserved when it bids, so it never
promises more than it has; a reservation the requester never answers expires on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.msg import Msg

from bacq import metrics, sdnotify, subjects
from bacq.bus import Bus, new_nonce
from bacq.errors import BacqError, InputUnavailable
from bacq.log import get_logger
from bacq.logs import LogStreamer
from bacq.models import (
    Announcement,
    Assignment,
    AssignmentReply,
    Bid,
    CancelReply,
    CancelRequest,
    ExecUpdate,
    NodeInfo,
    ResultMessage,
    RevealReply,
    RevealRequest,
    commit_reveal,
    commitment_of,
    decode,
    encode,
    now,
)
from bacq.nodes import NodeRegistry
from bacq.spec import JobSpec
from bacq.states import ExecState
from bacq.storage import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    Storage,
    remove_tree,
    sanitize_tree,
)
from bacq.worker import kept, workdir
from bacq.worker.executor import Executor, JobContext, WorkerContext

__all__ = ["Worker", "WorkerConfig"]

NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
RESERVATION_GRACE = 30.0  # seconds a bid's reservation outlives the bid deadline without an answer
REVEAL_KEEP = 3600.0  # seconds a committed result waits for the verifier to ask for it
REVEAL_MAX = 64  # committed results kept at once (the oldest is dropped past it)
RAN_REMEMBERED = 10_000  # job ids of finished runs a worker remembers (an assignment sent again)
PROGRESS_LINGER = 0.25  # seconds a step's report waits for a later one that replaces it
_STEPS = frozenset({ExecState.DOWNLOADING, ExecState.RUNNING, ExecState.PUBLISHING})


@dataclass
class _Committed:
    """A result folder whose CID this worker committed to and has not published yet."""

    job_dir: Path
    results_dir: Path
    cid: str
    exit_code: int
    nonce: str
    expires: float
    published: bool = False  # its blocks are in IPFS already (no second add at the reveal)


@dataclass
class _Done:
    """An execution's result folder: its CID, and whether its blocks are in IPFS already."""

    cid: str
    exit_code: int
    fuel_used: int | None
    published: bool


@dataclass
class WorkerConfig:
    node_id: str
    nats_url: str
    ipfs_api: str
    work_dir: Path
    labels: dict[str, str] = field(default_factory=dict)
    cpu: float = float(os.cpu_count() or 1)
    memory: int = 4 * 1024**3
    max_jobs: int = 4
    fetch_timeout: float = 120.0
    heartbeat_interval: float = 2.0
    drain_timeout: float = 60.0  # on SIGTERM: seconds running jobs get to finish
    # a job's inputs together, checked from their DAGs before any byte is downloaded
    max_input_bytes: int = DEFAULT_MAX_BYTES
    max_input_entries: int = DEFAULT_MAX_ENTRIES
    # a job's results folder (outputs, stdout, stderr): entries and bytes, checked before adding
    max_result_entries: int = DEFAULT_MAX_ENTRIES
    results_limit: int = DEFAULT_MAX_BYTES
    tamper: bool = False  # a bad worker, for demonstrations and tests of the verifier
    # a lazy worker: runs no container and builds its result from whatever it can read of the
    # others' (job record, live output, IPFS), to show that it cannot; BACQ_WORKER_LAZY=1
    lazy: bool = field(default_factory=lambda: os.environ.get("BACQ_WORKER_LAZY") == "1")
    # a worker that reveals an exit code other than the one it committed to (as one that learnt
    # the others' result after committing would): BACQ_WORKER_SWITCH_REVEAL=1
    switch_reveal: bool = field(
        default_factory=lambda: os.environ.get("BACQ_WORKER_SWITCH_REVEAL") == "1"
    )

    def __post_init__(self) -> None:
        if not NODE_ID.match(self.node_id):
            raise ValueError(
                f"node id {self.node_id!r} must be letters, digits, _ or - (at most 63)"
            )


@dataclass
class _Reservation:
    cpu: float
    memory: int
    expires: float | None  # monotonic time; None once the job runs


async def _read_live_output(bus: Bus, job_id: str) -> list[str]:
    """What the live output stream holds for ``job_id`` (the lazy worker tries it)."""
    sub = await bus.js.subscribe(subjects.logs_of_job(job_id), ordered_consumer=True)
    try:
        msgs = []
        with contextlib.suppress(TimeoutError):
            while True:
                msg = await sub.next_msg(timeout=0.5)
                msgs.append(msg.data.decode(errors="replace"))
        return msgs
    finally:
        await sub.unsubscribe()


def _write_guess(results_dir: Path, outputs: list[str]) -> None:
    """The lazy worker's result: empty output folders, no output, exit code 0."""
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in outputs:
        (results_dir / name).mkdir(parents=True, exist_ok=True)
    (results_dir / "stdout").write_bytes(b"")
    (results_dir / "stderr").write_bytes(b"")
    (results_dir / "exitCode").write_text("0")


def live_logs_allowed(spec: JobSpec) -> bool:
    """Whether a running execution's output may be streamed live (``bacq logs -f``). Not for a
    job whose result is checked by comparing several workers': another worker's operator could
    read the output and copy the result instead of computing it. The submitter may opt in
    (``live_logs``), weakening the check; the output is in the results after the verdict."""
    if getattr(spec, "live_logs", False):
        return True
    return spec.verifier != "deterministic" or spec.concurrency <= 1


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        bus: Bus,
        storage: Storage,
        executor: Executor,
    ):
        self.config = config
        self.bus = bus
        self.storage = storage
        self.executor = executor
        self.log = get_logger("bacq.worker", node=config.node_id)
        self._reservations: dict[str, _Reservation] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done = 0
        self._cancelled: set[str] = set()
        self._registry = NodeRegistry(bus)
        self._draining = False
        self._started_at = now()
        # per execution, a secret chosen when it is accepted: its message ids and commitment
        self._nonces: dict[str, str] = {}
        self._committed: dict[str, _Committed] = {}  # job → result awaiting its reveal
        self._kept = kept.Journal(config.work_dir)  # … and what it needs of it, on disk
        # jobs this process ran (the last RAN_REMEMBERED): an assignment sent again is not run
        # again (dict: insertion-ordered, the oldest is forgotten first)
        self._ran: dict[str, None] = {}
        self._revealing: set[str] = set()
        self._reveal_tasks: set[asyncio.Task[None]] = set()
        # per execution, the step report waiting to go out (see _update) and its task
        self._progress: dict[str, ExecUpdate] = {}
        self._progress_tasks: dict[str, asyncio.Task[None]] = {}

    # -- capacity ---------------------------------------------------------------------------------
    def _free(self) -> tuple[float, int, int]:
        cpu = self.config.cpu - sum(r.cpu for r in self._reservations.values())
        memory = self.config.memory - sum(r.memory for r in self._reservations.values())
        return cpu, memory, self.config.max_jobs - len(self._reservations)

    def why_not(self, spec: JobSpec) -> str | None:
        """None when this worker can take ``spec`` now; otherwise the reason it cannot."""
        refused = self.executor.why_not(spec)  # e.g. network asked but not allowed here
        if refused is not None:
            return refused
        for key, value in spec.node_selector.items():
            if self.config.labels.get(key) != value:
                return f"label {key}={value} not on this worker"
        cpu, memory, slots = self._free()
        if slots <= 0:
            return "all job slots in use"
        if spec.resources.cpu > cpu + 1e-9:
            return f"needs {spec.resources.cpu:g} cpu, {cpu:g} free"
        if spec.resources.memory > memory:
            return f"needs {spec.resources.memory} bytes of memory, {memory} free"
        return None

    def _expire_reservations(self) -> None:
        t = time.monotonic()
        for job_id, reservation in list(self._reservations.items()):
            if reservation.expires is not None and reservation.expires < t:
                self.log.info("reservation.expired", job=job_id)
                del self._reservations[job_id]

    # -- NATS handlers ----------------------------------------------------------------------------
    async def on_announce(self, msg: Msg) -> None:
        try:
            announcement = decode(Announcement, msg.data)
        except ValueError as exc:
            self.log.warning("announce.malformed", error=str(exc))
            return
        self._expire_reservations()
        job_id, spec = announcement.job_id, announcement.spec
        if job_id in self._reservations:
            return
        reason = self.why_not(spec)
        if reason is not None:
            self.log.debug("bid.skipped", job=job_id, reason=reason)  # every job, every worker
            return
        remaining = (announcement.bid_deadline - now()).total_seconds()
        if remaining <= 0:
            return
        self._reservations[job_id] = _Reservation(
            cpu=spec.resources.cpu,
            memory=spec.resources.memory,
            expires=time.monotonic() + remaining + RESERVATION_GRACE,
        )
        bid = Bid(
            job_id=job_id,
            node_id=self.config.node_id,
            labels=self.config.labels,
            running=len(self._tasks),
        )
        await self.bus.publish(subjects.bid(self.config.node_id, job_id), bid)
        self.log.debug("bid.sent", job=job_id)  # one per invitation: not worth a line each

    async def on_assign(self, msg: Msg) -> None:
        try:
            assignment = decode(Assignment, msg.data)
        except ValueError as exc:
            await msg.respond(encode(AssignmentReply(ok=False, error=f"malformed: {exc}")))
            return
        job_id = assignment.job_id
        if not assignment.accepted:  # published without a reply subject: nothing to answer
            if job_id not in self._tasks:
                self._reservations.pop(job_id, None)
            self.log.info("bid.rejected", job=job_id, reason=assignment.reason)
            if msg.reply:
                await msg.respond(encode(AssignmentReply(ok=True)))
            return
        spec = assignment.spec
        if self._draining:
            self._reservations.pop(job_id, None)
            await msg.respond(encode(AssignmentReply(ok=False, error="worker is shutting down")))
            return
        if spec is None:
            await msg.respond(encode(AssignmentReply(ok=False, error="assignment without a spec")))
            return
        if job_id in self._tasks:  # a retried request: already running
            await msg.respond(encode(AssignmentReply(ok=True)))
            return
        if job_id in self._committed or job_id in self._ran:
            # sent again by a requester that restarted before it heard how the job went: it ran
            # here already, and its report is on the way. Running it again would commit another
            # nonce than the one the verifier holds, and the reveal would not match.
            self._reservations.pop(job_id, None)
            await msg.respond(encode(AssignmentReply(ok=True)))
            self.log.info("job.assigned_again", job=job_id, kept=job_id in self._committed)
            return
        if job_id not in self._reservations:
            reason = self.why_not(spec)
            if reason is not None:
                await msg.respond(encode(AssignmentReply(ok=False, error=reason)))
                return
            self._reservations[job_id] = _Reservation(
                spec.resources.cpu, spec.resources.memory, None
            )
        self._reservations[job_id].expires = None
        self._nonces[job_id] = new_nonce()
        self._tasks[job_id] = asyncio.create_task(self._run_job(job_id, spec), name=f"job-{job_id}")
        await msg.respond(encode(AssignmentReply(ok=True)))
        self.log.info("job.accepted", job=job_id)

    # -- running a job ----------------------------------------------------------------------------
    def _msg_id(self, job_id: str, what: str) -> str:
        # unguessable (the execution's nonce) and the same across this process's retries
        nonce = self._nonces.setdefault(job_id, new_nonce())
        return f"{job_id}.{self.config.node_id}.{nonce}.{what}"

    async def _update(self, job_id: str, state: ExecState, **fields: object) -> None:
        """Report how far an execution got. A step on the way (downloading, running,
        publishing) waits ``PROGRESS_LINGER`` seconds and goes out only if no later report
        replaced it: a short job reports its end alone, a long one each step a moment late."""
        update = ExecUpdate(job_id=job_id, node_id=self.config.node_id, state=state, **fields)
        if state in _STEPS:
            self._progress[job_id] = update
            if job_id not in self._progress_tasks:
                self._progress_tasks[job_id] = asyncio.create_task(
                    self._report_later(job_id), name=f"progress-{job_id}"
                )
            return
        # an end: the step still waiting is replaced; one being sent goes first (in order)
        waiting = self._progress.pop(job_id, None)
        task = self._progress_tasks.pop(job_id, None)
        if task is not None:
            if waiting is not None:
                task.cancel()
            await asyncio.wait({task})  # (its own outcome is not ours to raise)
        await self._publish_update(update)

    async def _report_later(self, job_id: str) -> None:
        try:
            await asyncio.sleep(PROGRESS_LINGER)
            update = self._progress.pop(job_id, None)
            if update is not None:
                await self._publish_update(update)
        finally:
            if self._progress_tasks.get(job_id) is asyncio.current_task():
                del self._progress_tasks[job_id]

    async def _publish_update(self, update: ExecUpdate) -> None:
        await self.bus.publish_durable(
            subjects.exec_update(update.job_id, self.config.node_id),
            update,
            msg_id=self._msg_id(update.job_id, update.state.value),
        )

    async def _send_result(self, result: ResultMessage) -> None:
        await self.bus.publish_durable(
            subjects.verify(result.job_id, self.config.node_id),
            result,
            msg_id=self._msg_id(result.job_id, result.kind),
        )

    def _commit(
        self, job_id: str, job_dir: Path, cid: str, exit_code: int, *, published: bool = False
    ) -> ResultMessage:
        """Keep the result (unpublished) until the verifier asks for it; the commitment."""
        nonce = self._nonces.setdefault(job_id, new_nonce())
        self._committed[job_id] = _Committed(
            job_dir=job_dir,
            results_dir=job_dir / "results",
            cid=cid,
            exit_code=exit_code,
            nonce=nonce,
            expires=time.monotonic() + REVEAL_KEEP,
            published=published,
        )
        self._trim_committed()
        commitment = commitment_of(cid, exit_code, self.config.node_id, nonce)
        return ResultMessage(job_id=job_id, node_id=self.config.node_id, commitment=commitment)

    def _trim_committed(self) -> None:
        while len(self._committed) > REVEAL_MAX:
            oldest = next(iter(self._committed))
            self._drop_committed(oldest, "too many results awaiting their reveal")

    def _keep_on_disk(self, job_id: str) -> None:
        """Best effort: a disk that refuses it costs the result only if this worker restarts."""
        committed = self._committed[job_id]
        try:
            self._write_kept(job_id, committed)
        except OSError as exc:
            self.log.warning("result.not_kept_on_disk", job=job_id, error=str(exc))

    def _write_kept(self, job_id: str, committed: _Committed) -> None:
        self._kept.keep(
            job_id,
            kept.Kept(
                cid=committed.cid,
                exit_code=committed.exit_code,
                nonce=committed.nonce,
                expires_at=time.time() + (committed.expires - time.monotonic()),
                published=committed.published,
            ),
        )

    def _reload_kept(self) -> None:
        """The results committed to before a restart (``bacq.worker.kept``), kept again."""
        try:
            records = self._kept.load_all()
        except OSError as exc:
            self.log.warning("results.kept_unreadable", error=str(exc))
            return
        for job_id, record in records.items():
            job_dir = self.config.work_dir / "jobs" / job_id
            self._nonces[job_id] = record.nonce
            self._committed[job_id] = _Committed(
                job_dir=job_dir,
                results_dir=job_dir / "results",
                cid=record.cid,
                exit_code=record.exit_code,
                nonce=record.nonce,
                expires=time.monotonic() + max(0.0, record.expires_at - time.time()),
                published=record.published,
            )
        self._trim_committed()
        if self._committed:
            self.log.info("results.kept_again", jobs=sorted(self._committed)[:50])

    def _drop_committed(self, job_id: str, why: str) -> None:
        committed = self._committed.pop(job_id, None)
        self._nonces.pop(job_id, None)
        with contextlib.suppress(OSError):
            self._kept.forget(job_id)
        if committed is not None:
            self.log.info("result.dropped", job=job_id, reason=why)
            remove_tree(committed.job_dir)

    async def on_reveal(self, msg: Msg) -> None:
        """The verifier holds every chosen worker's commitment for these jobs: publish each
        result and say what it is (its CID, exit code and the nonce that proves the
        commitment)."""
        try:
            request = decode(RevealRequest, msg.data)
        except ValueError as exc:
            await msg.respond(encode(RevealReply(ok=False, error=f"malformed: {exc}")))
            return
        asked = list(dict.fromkeys(request.job_ids or [request.job_id]))
        missing = []
        for job_id in asked:
            committed = self._committed.get(job_id)
            if committed is None:
                missing.append(job_id)
                continue
            if job_id in self._revealing:  # asked again while the first reveal is under way
                continue
            # a subscription's callback runs one message at a time: reveal in a task of its own
            self._revealing.add(job_id)
            task = asyncio.create_task(self._reveal(job_id, committed), name=f"reveal-{job_id}")
            self._reveal_tasks.add(task)
            task.add_done_callback(self._reveal_tasks.discard)
        error = f"no result kept for {', '.join(missing[:20])}" if missing else None
        await msg.respond(encode(RevealReply(ok=len(missing) < len(asked), error=error)))

    async def _reveal(self, job_id: str, committed: _Committed) -> None:
        try:
            await self._publish_reveal(job_id, committed)
        finally:
            self._revealing.discard(job_id)

    async def _publish_reveal(self, job_id: str, committed: _Committed) -> None:
        try:
            if not committed.published and committed.results_dir.exists():
                cid = await self.storage.add(committed.results_dir)
                if cid != committed.cid:  # kubo gave another CID than --only-hash did
                    self.log.error("result.cid_changed", job=job_id, committed=committed.cid)
            await self._send_result(
                ResultMessage(
                    job_id=job_id,
                    node_id=self.config.node_id,
                    cid=committed.cid,
                    exit_code=committed.exit_code + (1 if self.config.switch_reveal else 0),
                    nonce=committed.nonce,
                )
            )
            self.log.info("result.revealed", job=job_id, cid=committed.cid)
        except BacqError as exc:
            self.log.warning("result.reveal_failed", job=job_id, error=str(exc))
            return  # kept: the verifier asks again
        if self._committed.get(job_id) is committed:
            self._committed.pop(job_id, None)
            self._nonces.pop(job_id, None)
            with contextlib.suppress(OSError):
                self._kept.forget(job_id)
            await asyncio.to_thread(remove_tree, committed.job_dir)

    def _expire_committed(self) -> None:
        t = time.monotonic()
        for job_id, committed in list(self._committed.items()):
            if committed.expires < t:
                self._drop_committed(job_id, "the verifier never asked for it")

    async def _run_job(self, job_id: str, spec: JobSpec) -> None:
        node = self.config.node_id
        log = self.log.bind(job=job_id)
        job_dir = self.config.work_dir / "jobs" / job_id
        started = time.monotonic()
        outcome = "failed"
        try:
            try:
                done = await self._execute(job_id, spec, job_dir, log)
                cid, exit_code = done.cid, done.exit_code
                outcome = "completed"
            except asyncio.CancelledError:
                # the container is gone already (the executor kills it on cancellation)
                if job_id in self._cancelled:
                    await self._update(job_id, ExecState.CANCELLED, detail="cancelled on request")
                else:  # shutting down: hand the job back so that another worker takes it
                    await self._update(
                        job_id, ExecState.LOST, error=f"worker {node} shut down and handed it back"
                    )
                raise
            except InputUnavailable as exc:  # another worker may reach the inputs: hand it back
                log.warning("job.handed_back", error=str(exc))
                await self._update(
                    job_id, ExecState.LOST, error=f"worker {node} could not fetch it: {exc}"
                )
            except BacqError as exc:
                log.warning("job.failed", error=str(exc))
                await self._send_result(ResultMessage(job_id=job_id, node_id=node, error=str(exc)))
                await self._update(job_id, ExecState.FAILED, error=str(exc))
            except Exception as exc:
                log.exception("job.crashed")
                error = f"internal worker error: {type(exc).__name__}: {exc}"
                await self._send_result(ResultMessage(job_id=job_id, node_id=node, error=error))
                await self._update(job_id, ExecState.FAILED, error=error)
            else:
                if commit_reveal(spec):
                    # the commitment only: neither the CID nor the exit code leaves this worker
                    # before the verifier holds every chosen worker's commitment (both in
                    # flight at once; they leave in this order on the one connection); what
                    # it needs to reveal is kept on disk too, should this worker restart
                    commitment = self._commit(job_id, job_dir, cid, exit_code)
                    self._keep_on_disk(job_id)
                    await asyncio.gather(
                        self._send_result(commitment),
                        self._update(job_id, ExecState.COMPLETED, fuel_used=done.fuel_used),
                    )
                else:  # the only worker: its result is published already, say it at once
                    self._commit(job_id, job_dir, cid, exit_code, published=done.published)
                    self._revealing.add(job_id)
                    await asyncio.gather(
                        self._reveal(job_id, self._committed[job_id]),
                        self._update(job_id, ExecState.COMPLETED, fuel_used=done.fuel_used),
                    )
                log.info("job.completed", cid=cid, exit_code=exit_code)
        finally:  # (its reservation was freed by _execute, once the container was gone)
            metrics.EXECUTION_SECONDS.labels(outcome).observe(time.monotonic() - started)
            self._tasks.pop(job_id, None)
            self._cancelled.discard(job_id)
            self._done += 1
            self._ran[job_id] = None
            if len(self._ran) > RAN_REMEMBERED:
                del self._ran[next(iter(self._ran))]
            if job_id not in self._committed:
                self._nonces.pop(job_id, None)
                if job_dir.exists():  # a noop job has none
                    await asyncio.shield(asyncio.to_thread(remove_tree, job_dir))

    async def _execute(self, job_id: str, spec: JobSpec, job_dir: Path, log: object) -> _Done:
        try:
            return await self._execute_job(job_id, spec, job_dir, log)
        finally:
            # the container is gone: free its slot before reporting, so that the requester,
            # which counts slots from those reports, finds it free when it invites the next bid
            self._reservations.pop(job_id, None)

    async def _execute_job(self, job_id: str, spec: JobSpec, job_dir: Path, log: object) -> _Done:
        if self.config.lazy:
            return await self._copy_instead(job_id, spec, job_dir / "results")
        streamer: LogStreamer | None = None
        allowed = live_logs_allowed(spec)

        def live() -> Callable[[str, bytes], None] | None:  # live output (bacq logs), if any
            nonlocal streamer
            if not allowed:
                return None
            if streamer is None:
                streamer = LogStreamer(self.bus, job_id, self.config.node_id)
                streamer.start()
            return streamer.feed

        budget = [self.config.max_input_bytes, self.config.max_input_entries]

        async def fetch(cid: str, target: Path) -> Path:
            """One input (or a wasm module) within what is left of the job's input budget: its
            DAG is measured first, so nothing over the limit is downloaded."""
            timeout = self.config.fetch_timeout
            local = await self.storage.fetch(
                cid, target, timeout=timeout, max_bytes=budget[0], max_entries=budget[1]
            )
            # what it took of the budget (its blocks are on this node now: a quick walk)
            size = await self.storage.measure(
                cid, max_bytes=budget[0], max_entries=budget[1], timeout=timeout
            )
            budget[0] -= size.bytes
            budget[1] -= size.entries
            return local

        async def report(state: ExecState, detail: str) -> None:
            await self._update(job_id, state, detail=detail)

        job = JobContext(
            job_id=job_id,
            name=f"bacq-{job_id}-{self.config.node_id}",
            labels={
                "bacq.job": job_id,
                "bacq.node": self.config.node_id,
                "bacq.work_dir": str(self.config.work_dir.resolve()),
            },
            job_dir=job_dir,
            fetch=fetch,
            report=report,
            live=live,
        )
        try:
            result = await self.executor.run(spec, job)
        finally:
            if streamer is not None:
                await streamer.close()

        if result.cid is not None:  # published by the engine itself (noop: one fixed result)
            return _Done(result.cid, result.exit_code, result.fuel_used, published=True)
        await self._update(job_id, ExecState.PUBLISHING, fuel_used=result.fuel_used)
        results_dir = job.results_dir
        results_dir.mkdir(parents=True, exist_ok=True)
        if self.config.tamper:
            with (results_dir / "stdout").open("ab") as stdout:
                stdout.write(f"\n(tampered by {self.config.node_id})\n".encode())
        (results_dir / "exitCode").write_text(str(result.exit_code))
        skipped = await asyncio.to_thread(
            sanitize_tree,
            results_dir,
            max_entries=self.config.max_result_entries,
            max_bytes=self.config.results_limit,
        )
        if skipped:
            self.log.warning("results.skipped_entries", job=job_id, entries=skipped[:20])
        # with commit-reveal, the CID only: no block is published until the verifier asks
        only_hash = commit_reveal(spec)
        cid = await self.storage.add(results_dir, only_hash=only_hash)
        return _Done(cid, result.exit_code, result.fuel_used, published=not only_hash)

    async def _copy_instead(self, job_id: str, spec: JobSpec, results_dir: Path) -> _Done:
        """The lazy worker: try every channel a worker can read for the others' output, then
        commit to a folder built from what it found (or a guess). Each channel is closed to it
        before the verdict: its NATS user may read neither job records nor the live output
        stream, the others publish no block before every commitment is in, and a deterministic
        job with several workers streams no live output at all."""
        found: dict[str, str] = {}
        for channel, read in (
            ("job record", lambda: self.bus.load_job(job_id)),
            ("live output", lambda: _read_live_output(self.bus, job_id)),
        ):
            try:
                async with asyncio.timeout(3):
                    value = await read()
                found[channel] = repr(value)[:200]
            except Exception as exc:  # refused (permissions) or nothing there
                found[channel] = f"refused: {type(exc).__name__}"
        self.log.warning("lazy.channels", job=job_id, found=found)
        await asyncio.to_thread(_write_guess, results_dir, [o.name for o in spec.outputs])
        await self._update(job_id, ExecState.PUBLISHING)
        return _Done(await self.storage.add(results_dir, only_hash=True), 0, None, published=False)

    # -- lifecycle --------------------------------------------------------------------------------
    def info(self) -> NodeInfo:
        return NodeInfo(
            node_id=self.config.node_id,
            labels=self.config.labels,
            cpu=self.config.cpu,
            memory=self.config.memory,
            max_jobs=self.config.max_jobs,
            running=len(self._tasks),
            jobs=sorted(self._tasks),
            draining=self._draining,
            network=self.executor.allow_network,
            started_at=self._started_at,
        )

    async def on_cancel(self, msg: Msg) -> None:
        try:
            request = decode(CancelRequest, msg.data)
        except ValueError as exc:
            await msg.respond(encode(CancelReply(ok=False, error=f"malformed: {exc}")))
            return
        task = self._tasks.get(request.job_id)
        if task is None:  # bid on but not started: just free what the bid reserved
            self._reservations.pop(request.job_id, None)
        else:
            self._cancelled.add(request.job_id)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # returns once the container is removed and the slot is free
        self.log.info("job.cancelled", job=request.job_id, was_running=task is not None)
        await msg.respond(encode(CancelReply(ok=True, state="cancelled")))

    async def _heartbeat(self) -> None:
        # the heartbeat, and this node's key in the bacq-nodes bucket (for bacq nodes)
        with contextlib.suppress(Exception):
            await self._registry.heartbeat(self.info())

    async def serve(self, stop: asyncio.Event) -> None:
        """Bid, run and report until ``stop`` is set; then drain: bid no more, give running jobs
        ``drain_timeout`` seconds to finish, and hand back the ones that did not. The work
        directory is this worker's alone meanwhile (``ConfigError`` if another one holds it)."""
        with workdir.claimed(self.config.work_dir):
            try:
                await self._serve(stop)
            finally:
                self._kept.close()

    async def _serve(self, stop: asyncio.Event) -> None:
        await self.executor.start(
            WorkerContext(
                storage=self.storage,
                node_id=self.config.node_id,
                work_dir=self.config.work_dir,
                tamper=self.config.tamper,
            )
        )
        metrics.start()
        metrics.observe(
            reconnects=lambda: self.bus.reconnects,
            slots=lambda: (len(self._reservations), max(0, self._free()[2])),
        )
        leftovers = await asyncio.to_thread(
            self.executor.remove_leftovers,
            self.config.node_id,
            str(self.config.work_dir.resolve()),
        )
        if leftovers:
            self.log.warning("containers.leftover_removed", containers=leftovers)
        self._reload_kept()
        removed = await asyncio.to_thread(
            workdir.remove_leftover_jobs, self.config.work_dir, set(self._committed)
        )
        if removed:
            self.log.warning("jobs.leftover_removed", jobs=removed[:50], count=len(removed))
        invite_sub = await self.bus.subscribe(
            subjects.invite(self.config.node_id), self.on_announce
        )
        reveal_sub = await self.bus.subscribe(subjects.reveal(self.config.node_id), self.on_reveal)
        assign_sub = await self.bus.subscribe(subjects.assign(self.config.node_id), self.on_assign)
        cancel_sub = await self.bus.subscribe(subjects.cancel(self.config.node_id), self.on_cancel)
        await self.bus.nc.flush()
        await self._heartbeat()
        self.log.info("service.ready", service="worker", labels=self.config.labels)
        sdnotify.ready()
        try:
            while not stop.is_set():
                self._expire_reservations()
                self._expire_committed()
                await self._heartbeat()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.config.heartbeat_interval)
        finally:
            self._draining = True
            with contextlib.suppress(Exception):
                await invite_sub.unsubscribe()
            self.log.info(
                "service.draining", running=sorted(self._tasks), timeout=self.config.drain_timeout
            )
            await self._drain()
            with contextlib.suppress(Exception):
                await assign_sub.unsubscribe()
                await cancel_sub.unsubscribe()
                await reveal_sub.unsubscribe()
            self.log.info("service.stopped", service="worker")

    async def _drain(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.drain_timeout
        while self._tasks and asyncio.get_running_loop().time() < deadline:
            await self._heartbeat()  # still alive: the requester must not give the jobs away
            await asyncio.sleep(
                min(
                    self.config.heartbeat_interval,
                    max(0.0, deadline - asyncio.get_running_loop().time()),
                )
            )
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()  # each hands its job back (ExecState.LOST) once its container is gone
        await asyncio.gather(*tasks, return_exceptions=True)

    def status_line(self) -> str:
        return f"running {len(self._tasks)} jobs, {self._done} done"
