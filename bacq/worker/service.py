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
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.msg import Msg

from bacq import sdnotify, subjects
from bacq.bus import Bus
from bacq.errors import BacqError, StorageError
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
    decode,
    encode,
    now,
)
from bacq.nodes import NodeRegistry
from bacq.spec import JobSpec
from bacq.states import ExecState
from bacq.storage import Storage, remove_tree, sanitize_tree
from bacq.worker.executor import DockerExecutor, bind
from bacq.worker.noop import NoopExecutor

__all__ = ["Worker", "WorkerConfig"]

NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
RESERVATION_GRACE = 30.0  # seconds a bid's reservation outlives the bid deadline without an answer


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
    tamper: bool = False  # a bad worker, for demonstrations and tests of the verifier

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


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        bus: Bus,
        storage: Storage,
        executor: DockerExecutor | NoopExecutor,
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
        self._fixed_cid: str | None = None  # the noop executor's one result, added at start
        self._started_at = now()

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
        if announcement.nodes is not None and self.config.node_id not in announcement.nodes:
            return  # the requester invited other workers (with free slots) to bid
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
        await self.bus.publish(subjects.bids(job_id), bid)
        self.log.info("bid.sent", job=job_id)

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
        if job_id not in self._reservations:
            reason = self.why_not(spec)
            if reason is not None:
                await msg.respond(encode(AssignmentReply(ok=False, error=reason)))
                return
            self._reservations[job_id] = _Reservation(
                spec.resources.cpu, spec.resources.memory, None
            )
        self._reservations[job_id].expires = None
        self._tasks[job_id] = asyncio.create_task(self._run_job(job_id, spec), name=f"job-{job_id}")
        await msg.respond(encode(AssignmentReply(ok=True)))
        self.log.info("job.accepted", job=job_id)

    # -- running a job ----------------------------------------------------------------------------
    async def _update(self, job_id: str, state: ExecState, **fields: object) -> None:
        update = ExecUpdate(job_id=job_id, node_id=self.config.node_id, state=state, **fields)
        await self.bus.publish_durable(
            subjects.exec_update(job_id, self.config.node_id),
            update,
            msg_id=f"exec.{job_id}.{self.config.node_id}.{state.value}",
        )

    async def _send_result(self, result: ResultMessage) -> None:
        await self.bus.publish_durable(
            subjects.verify(result.job_id, self.config.node_id),
            result,
            msg_id=f"verify.{result.job_id}.{self.config.node_id}",
        )

    async def _run_job(self, job_id: str, spec: JobSpec) -> None:
        node = self.config.node_id
        log = self.log.bind(job=job_id)
        job_dir = self.config.work_dir / "jobs" / job_id
        try:
            try:
                cid, exit_code = await self._execute(job_id, spec, job_dir, log)
            except asyncio.CancelledError:
                # the container is gone already (the executor kills it on cancellation)
                if job_id in self._cancelled:
                    await self._update(job_id, ExecState.CANCELLED, detail="cancelled on request")
                else:  # shutting down: hand the job back so that another worker takes it
                    await self._update(
                        job_id, ExecState.LOST, error=f"worker {node} shut down and handed it back"
                    )
                raise
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
                # both in flight at once (they leave in this order on the one connection)
                await asyncio.gather(
                    self._send_result(
                        ResultMessage(job_id=job_id, node_id=node, cid=cid, exit_code=exit_code)
                    ),
                    self._update(
                        job_id,
                        ExecState.COMPLETED,
                        exit_code=exit_code,
                        detail=f"exit code {exit_code}",
                    ),
                )
                log.info("job.completed", cid=cid, exit_code=exit_code)
        finally:  # (its reservation was freed by _execute, once the container was gone)
            self._tasks.pop(job_id, None)
            self._cancelled.discard(job_id)
            self._done += 1
            if job_dir.exists():  # a noop job has none
                await asyncio.shield(asyncio.to_thread(remove_tree, job_dir))

    async def _execute(
        self, job_id: str, spec: JobSpec, job_dir: Path, log: object
    ) -> tuple[str, int]:
        try:
            return await self._execute_job(job_id, spec, job_dir, log)
        finally:
            # the container is gone: free its slot before reporting, so that the requester,
            # which counts slots from those reports, finds it free when it invites the next bid
            self._reservations.pop(job_id, None)

    async def _execute_job(
        self, job_id: str, spec: JobSpec, job_dir: Path, log: object
    ) -> tuple[str, int]:
        if self._fixed_cid is not None:  # noop: the message path only, no Docker, no IPFS
            await self._update(job_id, ExecState.RUNNING, detail="noop executor")
            await self._update(job_id, ExecState.PUBLISHING)
            return self._fixed_cid, 0
        if not isinstance(self.executor, DockerExecutor):
            raise AssertionError("a noop worker runs jobs once its fixed result is added")
        inputs_dir, results_dir = job_dir / "inputs", job_dir / "results"
        results_dir.mkdir(parents=True, exist_ok=True)
        inputs_dir.mkdir(parents=True, exist_ok=True)

        mounts = []
        if spec.inputs:
            await self._update(job_id, ExecState.DOWNLOADING, detail=f"{len(spec.inputs)} input(s)")
        for index, volume in enumerate(spec.inputs):
            try:
                local = await self.storage.fetch(
                    volume.cid, inputs_dir / str(index), timeout=self.config.fetch_timeout
                )
            except StorageError as exc:
                raise StorageError(f"input {volume.cid} for {volume.path}: {exc}") from None
            mounts.append(bind(local, volume.path, read_only=True))
        for output in spec.outputs:
            host = results_dir / output.name
            host.mkdir()
            mounts.append(bind(host, output.path, read_only=False))

        await self._update(job_id, ExecState.RUNNING, detail=spec.image)
        streamer = LogStreamer(self.bus, job_id, self.config.node_id)  # live output (bacq logs)
        streamer.start()
        try:
            result = await self.executor.run(
                spec,
                name=f"bacq-{job_id}-{self.config.node_id}",
                mounts=mounts,
                labels={
                    "bacq.job": job_id,
                    "bacq.node": self.config.node_id,
                    "bacq.work_dir": str(self.config.work_dir.resolve()),
                },
                output=streamer.feed,
            )
        finally:
            await streamer.close()

        await self._update(job_id, ExecState.PUBLISHING)
        stdout = result.stdout
        if self.config.tamper:
            stdout += f"\n(tampered by {self.config.node_id})\n".encode()
        (results_dir / "stdout").write_bytes(stdout)
        (results_dir / "stderr").write_bytes(result.stderr)
        (results_dir / "exitCode").write_text(str(result.exit_code))
        skipped = await asyncio.to_thread(sanitize_tree, results_dir)
        if skipped:
            self.log.warning("results.skipped_entries", job=job_id, entries=skipped[:20])
        cid = await self.storage.add(results_dir)
        return cid, result.exit_code

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
        ``drain_timeout`` seconds to finish, and hand back the ones that did not."""
        if isinstance(self.executor, NoopExecutor):
            tamper = f"(tampered by {self.config.node_id})\n" if self.config.tamper else ""
            folder = self.executor.write_result(self.config.work_dir / "noop-result", tamper=tamper)
            self._fixed_cid = await self.storage.add(folder)
            self.log.info("noop.result", cid=self._fixed_cid)
        leftovers = await asyncio.to_thread(
            self.executor.remove_leftovers,
            self.config.node_id,
            str(self.config.work_dir.resolve()),
        )
        if leftovers:
            self.log.warning("containers.leftover_removed", containers=leftovers)
        announce_sub = await self.bus.subscribe(subjects.ANNOUNCE, self.on_announce)
        invite_sub = await self.bus.subscribe(
            subjects.invite(self.config.node_id), self.on_announce
        )
        assign_sub = await self.bus.subscribe(subjects.assign(self.config.node_id), self.on_assign)
        cancel_sub = await self.bus.subscribe(subjects.cancel(self.config.node_id), self.on_cancel)
        await self.bus.nc.flush()
        await self._heartbeat()
        self.log.info("service.ready", service="worker", labels=self.config.labels)
        sdnotify.ready()
        try:
            while not stop.is_set():
                self._expire_reservations()
                await self._heartbeat()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.config.heartbeat_interval)
        finally:
            self._draining = True
            with contextlib.suppress(Exception):
                await announce_sub.unsubscribe()
                await invite_sub.unsubscribe()
            self.log.info(
                "service.draining", running=sorted(self._tasks), timeout=self.config.drain_timeout
            )
            await self._drain()
            with contextlib.suppress(Exception):
                await assign_sub.unsubscribe()
                await cancel_sub.unsubscribe()
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
