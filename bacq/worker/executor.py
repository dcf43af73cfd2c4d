"""What a worker asks of an execution engine (``Executor``), and the Docker engine. Touches the
Docker daemon and the job's own folders only.

``Executor`` is the one interface between the worker and an engine: can you run this spec
(``why_not``), run it (``run``, with a ``JobContext`` that fetches the inputs, makes the output
folders and takes live output; cancelling the ``run`` task kills the job and returns once nothing
of it is left), remove what a crashed worker left behind (``remove_leftovers``). ``DockerExecutor``,
``bacq.worker.wasm.WasmExecutor`` and ``bacq.worker.noop.NoopExecutor`` implement it; ``Engines``
sends each job to the engine its spec names (``make_executor`` builds the worker's).

docker-py blocks, so every call runs in a thread; the job's deadline is enforced here (docker-py's
``wait(timeout=)`` is only a request timeout), and a cancelled or overdue container is killed.
Containers are removed after their logs are read (``auto_remove`` would race with that).

Every container is hardened by default: no network (unless the job asks and the worker allows it),
every capability dropped, no-new-privileges, a read-only root filesystem with a small tmpfs on
``/tmp``, pids/memory/cpu limits, and a non-root user (see ``container_user``). stdout and stderr
are streamed to files while the container runs (never held in memory), counted against the results
limit together with the writable mounts; past it the container is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import Mount

from bacq.errors import (
    CommandNotFound,
    DockerUnavailable,
    ExecutionError,
    ImageUnavailable,
    InputUnavailable,
    IpfsUnavailable,
    JobTimeout,
    ResultsTooLarge,
    StorageError,
)
from bacq.log import get_logger
from bacq.logs import MAX_BYTES as LIVE_MAX_BYTES
from bacq.spec import JobSpec
from bacq.states import ExecState

if TYPE_CHECKING:
    from bacq.storage import Storage

__all__ = [
    "DEFAULT_RESULTS_LIMIT",
    "ContainerResult",
    "DockerExecutor",
    "Engines",
    "ExecResult",
    "Executor",
    "JobContext",
    "Mounted",
    "WorkerContext",
    "listed_name",
    "make_executor",
    "tree_size",
]

log = get_logger("bacq.worker.executor")
_WAIT_SLICE = 2.0  # seconds per docker wait request; deadline and output size checked between
DEFAULT_RESULTS_LIMIT = 1024**3  # bytes of outputs + stdout + stderr per job (--results-limit)
DEFAULT_TMPFS = "64m"  # the container's writable /tmp (its root filesystem is read-only)
NOBODY = "65534:65534"
_FOLLOW_GRACE = 60.0  # seconds the log followers get, once the container exited, to finish
_LIVE_FEED = 2 * LIVE_MAX_BYTES  # bytes per stream handed to live output (it sends at most half)


# -- the interface between a worker and its engines --------------------------------------------
@dataclass(frozen=True)
class Mounted:
    """A folder or file on the worker's disk (``host``) and where the job sees it (``path``)."""

    host: Path
    path: str


@dataclass(frozen=True)
class ExecResult:
    """How a job ended. ``stdout``/``stderr`` are in the job's results folder already; ``cid`` is
    set when the engine published its result itself (noop: the same folder for every job)."""

    exit_code: int
    fuel_used: int | None = None
    cid: str | None = None


@dataclass
class JobContext:
    """What the worker hands an engine for one job: where its results go, how to fetch a CID
    (``fetch(cid, target)``), how to report progress (``report(state, detail)``), live output."""

    job_id: str
    name: str  # unique per job and worker (the container's name)
    labels: dict[str, str]
    job_dir: Path  # the job's own folder; removed by the worker afterwards
    fetch: Callable[[str, Path], Awaitable[Path]]
    report: Callable[[ExecState, str], Awaitable[None]]  # progress: (state, detail)
    # starts live output and returns its feed; None when this job's output may not go out live
    live: Callable[[], Callable[[str, bytes], None] | None]
    _outputs: list[Mounted] = field(default_factory=list)

    @property
    def results_dir(self) -> Path:
        """The folder the worker publishes: ``stdout``, ``stderr`` and one folder per output."""
        return self.job_dir / "results"

    async def inputs(self, spec: JobSpec) -> list[Mounted]:
        """Fetch the spec's inputs (reporting "downloading"); each lands in the job's folder."""
        if spec.inputs:
            await self.report(ExecState.DOWNLOADING, f"{len(spec.inputs)} input(s)")
        mounted = []
        for index, volume in enumerate(spec.inputs):
            try:
                local = await self.fetch(volume.cid, self.job_dir / "inputs" / str(index))
            except IpfsUnavailable as exc:  # this worker's kubo is away: another may have one
                raise InputUnavailable(f"input {volume.cid} for {volume.path}: {exc}") from None
            except StorageError as exc:  # (InputUnavailable stays what it is)
                raise type(exc)(f"input {volume.cid} for {volume.path}: {exc}") from None
            mounted.append(Mounted(local, volume.path))
        return mounted

    def outputs(self, spec: JobSpec) -> list[Mounted]:
        """Make the results folder and one empty folder per named output."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        mounted = []
        for output in spec.outputs:
            host = self.results_dir / output.name
            host.mkdir(exist_ok=True)
            mounted.append(Mounted(host, output.path))
        return mounted


@dataclass(frozen=True)
class WorkerContext:
    """What an engine may use once, when its worker starts (``Executor.start``)."""

    storage: Storage
    node_id: str
    work_dir: Path
    tamper: bool = False


class Executor(Protocol):
    """An execution engine, as a worker uses it (see the module docstring)."""

    allow_network: bool

    def why_not(self, spec: JobSpec) -> str | None:
        """None when this engine may run ``spec``; otherwise why not (the worker does not bid)."""
        ...

    async def start(self, worker: WorkerContext) -> None:
        """Once, before the first job (the noop engine publishes its fixed result here)."""
        ...

    async def run(self, spec: JobSpec, job: JobContext) -> ExecResult:
        """Run ``spec`` to its end, its deadline or one of its limits (a BacqError says which);
        cancelling it kills the job and returns once nothing of it runs any more."""
        ...

    def remove_leftovers(self, node_id: str, work_dir: str) -> list[str]:
        """Remove what a crashed worker of this node id and work directory left running."""
        ...

    def close(self) -> None: ...


class Engines:
    """The worker's executor: each job goes to the engine named by its spec's ``engine``."""

    def __init__(self, engines: dict[str, Executor]) -> None:
        if not engines:
            raise ValueError("a worker needs at least one engine")
        self.engines = engines
        self.allow_network = any(e.allow_network for e in engines.values())

    def _engine(self, spec: JobSpec) -> Executor | None:
        return self.engines.get(spec.engine)

    def why_not(self, spec: JobSpec) -> str | None:
        engine = self._engine(spec)
        if engine is None:
            return f"this worker runs no {spec.engine} jobs (engines: {', '.join(self.engines)})"
        return engine.why_not(spec)

    async def start(self, worker: WorkerContext) -> None:
        for engine in self.engines.values():
            await engine.start(worker)

    async def run(self, spec: JobSpec, job: JobContext) -> ExecResult:
        engine = self._engine(spec)
        if engine is None:
            raise ExecutionError(self.why_not(spec) or "no engine")
        return await engine.run(spec, job)

    def remove_leftovers(self, node_id: str, work_dir: str) -> list[str]:
        removed: list[str] = []
        for engine in self.engines.values():
            removed += engine.remove_leftovers(node_id, work_dir)
        return removed

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def make_executor(
    kind: str,
    *,
    allow_network: bool = False,
    results_limit: int = DEFAULT_RESULTS_LIMIT,
    container_user: str | None = None,
    tmpfs_size: str = DEFAULT_TMPFS,
    wasm: Any = None,
) -> Executor:
    """The executor of ``bacq worker --executor KIND``: ``docker`` (Docker and wasm jobs),
    ``wasm`` (wasm jobs only, no Docker needed) or ``noop``. ``wasm``: a WasmOptions."""
    from bacq.worker.noop import NoopExecutor
    from bacq.worker.wasm import WasmExecutor

    if kind == "noop":
        return NoopExecutor()
    engines: dict[str, Executor] = {"wasm": WasmExecutor(wasm, results_limit=results_limit)}
    if kind == "docker":
        engines["docker"] = DockerExecutor.from_env(
            allow_network=allow_network,
            results_limit=results_limit,
            container_user=container_user,
            tmpfs_size=tmpfs_size,
        )
    elif kind != "wasm":
        raise ValueError(f"unknown executor {kind!r}: use docker, wasm or noop")
    return Engines(engines)


def default_container_user() -> str:
    """The worker's own uid:gid when it is not root (its files stay its own), else nobody."""
    uid, gid = os.getuid(), os.getgid()
    return f"{uid}:{gid}" if uid != 0 else NOBODY


def tree_size(path: Path, *, stop_above: int | None = None) -> int:
    """Bytes of the regular files under ``path`` (links not followed); stops past ``stop_above``."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
            if stop_above is not None and total > stop_above:
                return total
    return total


@dataclass(frozen=True)
class ContainerResult:
    exit_code: int
    stdout: Path  # files the container's output was streamed to
    stderr: Path


def listed_name(container: Container) -> str:
    """The name of a container from a sparse listing (``containers.list(sparse=True)``: no
    inspection of each, so one removed meanwhile cannot fail the listing)."""
    return str((container.attrs.get("Names") or [container.id])[0]).lstrip("/")


class DockerExecutor:
    """Runs containers for a worker, with the limits of the job spec."""

    def __init__(
        self,
        client: docker.DockerClient,
        *,
        pull_timeout: float = 300.0,
        allow_network: bool = False,
        results_limit: int = DEFAULT_RESULTS_LIMIT,
        container_user: str | None = None,
        tmpfs_size: str = DEFAULT_TMPFS,
    ) -> None:
        """``container_user``: ``uid:gid`` to run as; None picks ``default_container_user()``;
        ``"image"`` keeps the image's own USER (root for most images)."""
        self._docker = client
        self._pull_timeout = pull_timeout
        self.allow_network = allow_network
        self.results_limit = results_limit
        self.container_user = container_user or default_container_user()
        self.tmpfs_size = tmpfs_size

    @classmethod
    def from_env(cls, *, pull_timeout: float = 300.0, **options: Any) -> DockerExecutor:
        try:
            client = docker.from_env(timeout=60)
            client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(
                f"the Docker daemon does not answer ({exc}); start dockerd "
                "(scripts/setup.sh does) or set DOCKER_HOST"
            ) from None
        return cls(client, pull_timeout=pull_timeout, **options)

    def why_not(self, spec: JobSpec) -> str | None:
        """None when this executor may run ``spec``; otherwise why not (the worker does not bid)."""
        if spec.network and not self.allow_network:
            return "the job needs network access and this worker does not allow it"
        return None

    def remove_leftovers(self, node_id: str, work_dir: str) -> list[str]:
        """Remove this worker's containers that a crash left behind (a worker killed mid-job).

        "This worker" is its node id *and* its work directory: another worker with the same id
        on the same Docker daemon (a second devstack, a test) keeps its running containers."""
        removed = []
        # sparse: no inspection of each (one removed meanwhile would fail it)
        leftovers = self._docker.containers.list(
            all=True,
            sparse=True,
            filters={"label": [f"bacq.node={node_id}", f"bacq.work_dir={work_dir}"]},
        )
        for container in leftovers:
            self._remove(container)
            removed.append(listed_name(container))
        return removed

    def close(self) -> None:
        self._docker.close()

    async def ensure_image(self, image: str) -> None:
        """Make sure ``image`` is present: pull it when missing, fail clearly when that fails."""
        try:
            await asyncio.to_thread(self._docker.images.get, image)
            return
        except docker.errors.ImageNotFound:
            pass
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(
                f"Docker failed while looking up image {image}: {exc}"
            ) from None
        repository, tag = _split_image(image)
        log.info("image.pull", image=image)
        try:
            async with asyncio.timeout(self._pull_timeout):
                await asyncio.to_thread(self._docker.images.pull, repository, tag=tag)
        except TimeoutError:
            raise ImageUnavailable(
                f"image {image} is not on this worker and pulling it took over "
                f"{self._pull_timeout:g}s"
            ) from None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            reason = getattr(exc, "explanation", None) or str(exc)
            raise ImageUnavailable(
                f"image {image} is not on this worker and could not be pulled: {reason}"
            ) from None

    async def start(self, worker: WorkerContext) -> None:
        pass

    async def run(self, spec: JobSpec, job: JobContext) -> ExecResult:
        """The ``Executor`` call: fetch the inputs, run the container, output into the results."""
        reason = self.why_not(spec)
        if reason is not None:
            raise ExecutionError(reason)
        mounts = [bind(m.host, m.path, read_only=True) for m in await job.inputs(spec)]
        mounts += [bind(m.host, m.path, read_only=False) for m in job.outputs(spec)]
        result = await self.run_container(
            spec,
            name=job.name,
            mounts=mounts,
            labels=job.labels,
            logs_dir=job.results_dir,
            output=job.live(),
            started=lambda: job.report(ExecState.RUNNING, spec.image),
        )
        return ExecResult(exit_code=result.exit_code)

    async def run_container(
        self,
        spec: JobSpec,
        *,
        name: str,
        mounts: list[Mount],
        labels: dict[str, str],
        logs_dir: Path,
        output: Callable[[str, bytes], None] | None = None,
        started: Callable[[], Awaitable[None]] | None = None,
    ) -> ContainerResult:
        """Run the container to its end or its deadline; always remove it afterwards.

        stdout and stderr are streamed to ``logs_dir/stdout`` and ``logs_dir/stderr`` as the
        container prints them, and handed to ``output(stream, data)`` when given (live output, for
        ``bacq logs -f``; the first few MiB of each stream). Raises ``ResultsTooLarge`` as soon as
        they and the writable mounts together exceed the results limit (the container is killed).
        ``started()`` is awaited once the container runs (the worker reports "running" then).
        """
        reason = self.why_not(spec)
        if reason is not None:
            raise ExecutionError(reason)
        await self.ensure_image(spec.image)
        await asyncio.to_thread(logs_dir.mkdir, parents=True, exist_ok=True)
        container = await asyncio.to_thread(self._create, spec, name, mounts, labels)
        capture = _LogCapture(self._docker, container, logs_dir, self.results_limit, output)
        try:
            try:
                await asyncio.to_thread(container.start)
            except docker.errors.APIError as exc:
                raise _start_error(spec, exc) from None
            capture.start()
            if started is not None:
                await started()
            exit_code = await self._wait(container, spec.timeout, mounts, capture)
            finished = await asyncio.to_thread(capture.join, _FOLLOW_GRACE)
            if capture.over:
                raise self._logs_too_large()
            if capture.error is not None:
                raise ExecutionError(
                    f"the job's container {container.name} went away while its output was read "
                    f"(removed by another process, or a restart of this worker): {capture.error}"
                )
            if not finished:
                raise ExecutionError(
                    f"the output of container {container.name} could not be read to its end "
                    f"within {_FOLLOW_GRACE:g}s of its exit (Docker is overloaded); run it again"
                )
            await self._check_results_size(mounts, capture.total)
            return ContainerResult(
                exit_code=exit_code, stdout=logs_dir / "stdout", stderr=logs_dir / "stderr"
            )
        finally:
            # on cancellation too: the container must not outlive the job (its removal also ends
            # the log followers)
            await asyncio.shield(asyncio.to_thread(self._remove, container))
            await asyncio.shield(asyncio.to_thread(capture.join, 5.0))
            capture.close()

    def _logs_too_large(self) -> ResultsTooLarge:
        return ResultsTooLarge(
            f"the job's stdout and stderr exceed this worker's limit of {self.results_limit} "
            "bytes for results while it ran, so the container was killed; print less, or use a "
            "worker with a larger --results-limit"
        )

    async def _check_results_size(self, mounts: list[Mount], logs: int) -> None:
        total = logs
        for mount in mounts:
            if mount.get("ReadOnly") or total > self.results_limit:
                continue
            total += await asyncio.to_thread(
                tree_size, Path(mount["Source"]), stop_above=self.results_limit - total
            )
        if total > self.results_limit:
            raise ResultsTooLarge(
                f"the job's results (output folders, stdout and stderr) exceed this worker's "
                f"limit of {self.results_limit} bytes (found at least {total} bytes); write "
                "less output or use a worker with a larger --results-limit"
            )

    def _user(self) -> str | None:
        return None if self.container_user == "image" else self.container_user  # image: its USER

    def _open_outputs(self, mounts: list[Mount]) -> None:
        """Let the container's user write its output folders when it is not the worker's user."""
        user = self._user()
        if user is None or user.split(":")[0] == str(os.getuid()):
            return
        for mount in mounts:
            if not mount.get("ReadOnly"):
                os.chmod(mount["Source"], 0o777)  # noqa: S103 - the folder is the job's output

    def _create(
        self, spec: JobSpec, name: str, mounts: list[Mount], labels: dict[str, str]
    ) -> Container:
        network = spec.network and self.allow_network
        self._open_outputs(mounts)
        try:
            return self._docker.containers.create(
                spec.image,
                command=spec.command or None,
                entrypoint=spec.entrypoint,
                environment=dict(spec.env),
                working_dir=spec.working_dir,
                name=name,
                labels=labels,
                mounts=mounts,
                network_mode="bridge" if network else "none",
                user=self._user(),
                read_only=True,
                tmpfs={"/tmp": f"rw,nosuid,nodev,size={self.tmpfs_size},mode=1777"},
                mem_limit=spec.resources.memory,
                memswap_limit=spec.resources.memory,
                nano_cpus=int(spec.resources.cpu * 1e9),
                pids_limit=spec.resources.pids,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                detach=True,
            )
        except docker.errors.ImageNotFound:
            raise ImageUnavailable(f"image {spec.image} disappeared from this worker") from None
        except docker.errors.APIError as exc:
            raise ExecutionError(
                f"Docker refused to create the container: {exc.explanation}"
            ) from None

    async def _wait(
        self, container: Container, timeout: float, mounts: list[Mount], capture: _LogCapture
    ) -> int:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if capture.over:
                await asyncio.to_thread(_kill, container)
                raise self._logs_too_large()
            if remaining <= 0:
                await asyncio.to_thread(_kill, container)
                raise JobTimeout(
                    f"the container ran longer than the job's timeout of {timeout:g}s and was "
                    "killed; raise --timeout if the job needs more time"
                )
            try:
                # between waits, the outputs so far: a job filling the disk is stopped early
                await self._check_results_size(mounts, capture.total)
            except ResultsTooLarge:
                await asyncio.to_thread(_kill, container)
                raise
            try:
                status = await asyncio.to_thread(
                    container.wait, timeout=max(1.0, min(_WAIT_SLICE, remaining))
                )
                return int(status.get("StatusCode", -1))
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                continue

    def _remove(self, container: Container) -> None:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            log.warning("container.remove_failed", container=container.name, error=str(exc))


class _LogCapture:
    """Follows a container's stdout and stderr (one thread each: a follow lasts as long as the
    job and would hold the default executor's few threads) into two files, at most ``limit``
    bytes for both; past that it kills the container and sets ``over``."""

    def __init__(
        self,
        client: docker.DockerClient,
        container: Container,
        folder: Path,
        limit: int,
        output: Callable[[str, bytes], None] | None,
    ) -> None:
        self._client = client
        self._container = container
        self._limit = limit
        self._output = output
        self._lock = threading.Lock()
        self.total = 0
        self.over = False
        self.error: str | None = None
        self._files: dict[str, BinaryIO] = {
            stream: (folder / stream).open("wb") for stream in ("stdout", "stderr")
        }
        self._threads = [
            threading.Thread(target=self._follow, args=(s,), name=f"logs-{s}", daemon=True)
            for s in ("stdout", "stderr")
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for both streams to end; True when they did."""
        end = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive() or thread.ident is not None:
                thread.join(max(0.0, end - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def close(self) -> None:
        for handle in self._files.values():
            with contextlib.suppress(OSError):
                handle.close()

    def _follow(self, stream: str) -> None:
        fed = 0
        handle = self._files[stream]
        chunks: Any = None
        try:
            chunks = self._client.api.logs(
                self._container.id or "",
                stdout=stream == "stdout",
                stderr=stream == "stderr",
                stream=True,
                follow=True,
            )
            for chunk in chunks:
                with self._lock:
                    if self.over:
                        break
                    self.total += len(chunk)
                    if self.total > self._limit:
                        self.over = True
                    else:
                        handle.write(chunk)
                if self.over:
                    _kill(self._container)
                    break
                if self._output is not None and fed < _LIVE_FEED:
                    fed += len(chunk)
                    with contextlib.suppress(Exception):  # live output is a convenience
                        self._output(stream, chunk)
            handle.flush()
        except (docker.errors.NotFound, docker.errors.APIError) as exc:
            self.error = str(exc)
        except Exception as exc:  # a connection cut by the container's removal
            log.debug("container.follow_failed", container=self._container.name, error=str(exc))
            self.error = self.error or f"{type(exc).__name__}: {exc}"
        finally:
            if chunks is not None:  # the stream, then its HTTP response (else its socket leaks)
                with contextlib.suppress(Exception):
                    chunks.close()
                with contextlib.suppress(Exception):
                    chunks._response.close()  # docker-py's CancellableStream keeps it private


def _kill(container: Container) -> None:
    with contextlib.suppress(docker.errors.APIError):
        container.kill()


def _start_error(spec: JobSpec, exc: docker.errors.APIError) -> ExecutionError:
    text = str(exc.explanation or exc)
    if "executable file not found" in text or "no such file or directory" in text:
        program = (spec.entrypoint or spec.command or ["(image default)"])[0]
        return CommandNotFound(
            f"command {program!r} was not found in image {spec.image}: check the program name "
            "or use an image that has it"
        )
    return ExecutionError(f"Docker could not start the container: {text}")


def _split_image(image: str) -> tuple[str, str]:
    if "@" in image:
        repository, digest = image.split("@", 1)
        return repository, digest
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repository, tag = image.rsplit(":", 1)
        return repository, tag
    return image, "latest"


def bind(source: Path, target: str, *, read_only: bool) -> Mount:
    return Mount(target=target, source=str(source), type="bind", read_only=read_only)
