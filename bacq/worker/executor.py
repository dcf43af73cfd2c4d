"""Run one job's container with Docker and collect what it printed. Touches the Docker daemon only.

docker-py blocks, so every call runs in a thread; the job's deadline is enforced here (docker-py's
``wait(timeout=)`` is only a request timeout), and a cancelled or overdue container is killed.
Containers are removed after their logs are read (``auto_remove`` would race with that).

Every container is hardened by default: no network (unless the job asks and the worker allows it),
every capability dropped, no-new-privileges, a read-only root filesystem with a small tmpfs on
``/tmp``, pids/memory/cpu limits, and a non-root user (see ``container_user``). After the container
exits, its outputs (writable mounts, stdout, stderr) are measured against the results limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    JobTimeout,
    ResultsTooLarge,
)
from bacq.log import get_logger
from bacq.spec import JobSpec

__all__ = ["DEFAULT_RESULTS_LIMIT", "ContainerResult", "DockerExecutor", "tree_size"]

log = get_logger("bacq.worker.executor")
_WAIT_SLICE = 2.0  # seconds per docker wait request; deadline and output size checked between
DEFAULT_RESULTS_LIMIT = 1024**3  # bytes of outputs + stdout + stderr per job (--results-limit)
DEFAULT_TMPFS = "64m"  # the container's writable /tmp (its root filesystem is read-only)
NOBODY = "65534:65534"


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
    stdout: bytes
    stderr: bytes


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
        leftovers = self._docker.containers.list(
            all=True,
            filters={"label": [f"bacq.node={node_id}", f"bacq.work_dir={work_dir}"]},
        )
        for container in leftovers:
            self._remove(container)
            removed.append(container.name or container.id or "?")
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

    async def run(
        self,
        spec: JobSpec,
        *,
        name: str,
        mounts: list[Mount],
        labels: dict[str, str],
        output: Callable[[str, bytes], None] | None = None,
    ) -> ContainerResult:
        """Run the container to its end or its deadline; always remove it afterwards.

        ``output(stream, data)``, when given, receives the output live ("stdout"/"stderr") from
        follower threads (for ``bacq logs -f``); the returned result holds all of it anyway.
        Raises ``ResultsTooLarge`` when the writable mounts, stdout and stderr together exceed
        the results limit.
        """
        reason = self.why_not(spec)
        if reason is not None:
            raise ExecutionError(reason)
        await self.ensure_image(spec.image)
        container = await asyncio.to_thread(self._create, spec, name, mounts, labels)
        try:
            try:
                await asyncio.to_thread(container.start)
            except docker.errors.APIError as exc:
                raise _start_error(spec, exc) from None
            followers = [] if output is None else self._follow(container, output)
            exit_code = await self._wait(container, spec.timeout, mounts)
            for follower in followers:  # let them hand over the last bytes
                await asyncio.to_thread(follower.join, 2.0)
            try:
                stdout = await asyncio.to_thread(container.logs, stdout=True, stderr=False)
                stderr = await asyncio.to_thread(container.logs, stdout=False, stderr=True)
            except (docker.errors.NotFound, docker.errors.APIError) as exc:
                raise ExecutionError(
                    f"the job's container {container.name} was removed while it ran (by another "
                    f"process, or a restart of this worker cleaning up): {exc}"
                ) from None
            await self._check_results_size(mounts, len(stdout) + len(stderr))
            return ContainerResult(exit_code=exit_code, stdout=stdout, stderr=stderr)
        finally:
            # on cancellation too: the container must not outlive the job
            await asyncio.shield(asyncio.to_thread(self._remove, container))

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

    async def _wait(self, container: Container, timeout: float, mounts: list[Mount]) -> int:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await asyncio.to_thread(_kill, container)
                raise JobTimeout(
                    f"the container ran longer than the job's timeout of {timeout:g}s and was "
                    "killed; raise --timeout if the job needs more time"
                )
            try:
                # between waits, the outputs so far: a job filling the disk is stopped early
                await self._check_results_size(mounts, 0)
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

    def _follow(
        self, container: Container, output: Callable[[str, bytes], None]
    ) -> list[threading.Thread]:
        # own threads, not asyncio.to_thread: a follow lasts as long as the job and would hold
        # the default executor's few threads
        def follow(stream: str) -> None:
            try:
                chunks = self._docker.api.logs(
                    container.id or "",
                    stdout=stream == "stdout",
                    stderr=stream == "stderr",
                    stream=True,
                    follow=True,
                )
                for chunk in chunks:
                    output(stream, chunk)
            except Exception as exc:  # live output is a convenience: the result has it all
                log.debug("container.follow_failed", container=container.name, error=str(exc))

        threads = [
            threading.Thread(target=follow, args=(s,), name=f"logs-{s}", daemon=True)
            for s in ("stdout", "stderr")
        ]
        for thread in threads:
            thread.start()
        return threads

    def _remove(self, container: Container) -> None:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            log.warning("container.remove_failed", container=container.name, error=str(exc))


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
