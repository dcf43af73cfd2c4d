"""``bacq doctor``: can this machine reach NATS, kubo and Docker, and in which versions?

Touches what it checks, read-only: a NATS connection (server version, JetStream, the requester
and the workers' records), the kubo RPC API (``id``, ``version``) and the Docker daemon
(``version``).
Each check says what is wrong and how to fix it; nothing is changed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from bacq import subjects
from bacq.bus import Bus
from bacq.errors import BacqError
from bacq.lease import read_leases
from bacq.models import now
from bacq.nodes import OFFLINE_AFTER, read_nodes
from bacq.storage import Storage, import_client

__all__ = ["Check", "run_checks"]

CHECK_TIMEOUT = 30.0  # seconds a check may take before it is failed
T = TypeVar("T")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str  # what was found (versions, addresses)
    fix: str = ""  # what to do when not ok
    required: bool = True  # a failed optional check (e.g. Docker on a pure client) is a warning

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _check_nats(url: str) -> list[Check]:
    try:
        bus = await Bus.connect(url, name="bacq-doctor", wait=3.0)
    except BacqError as exc:
        return [
            Check(
                "nats",
                False,
                f"no NATS server answers at {url}",
                f"{exc}".split("; ", 1)[-1] if "; " in str(exc) else str(exc),
            )
        ]
    checks = []
    try:
        server = bus.nc.connected_server_version
        version = f"{server.major}.{server.minor}.{server.patch}"
        checks.append(Check("nats", True, f"nats-server {version} at {url}, JetStream on"))
        try:
            await bus.nc.request(subjects.SUBMIT, b"", timeout=2.0)
            checks.append(Check("requester", True, "a requester answers on " + subjects.SUBMIT))
        except Exception:
            checks.append(
                Check(
                    "requester",
                    False,
                    "no requester answers job submissions",
                    "start one: `bacq requester` (or `bacq devstack`)",
                )
            )
        leases = await read_leases(bus)
        for role in ("requester", "verifier"):
            holder = leases.get(role)
            checks.append(
                Check(
                    f"{role} lease",
                    holder is not None,
                    f"active {role}: {holder.instance} since {holder.since:%H:%M:%S}"
                    if holder
                    else f"no {role} holds the lease",
                    "" if holder else f"start one: `bacq {role}` (or `bacq devstack`)",
                    required=False,
                )
            )
        nodes = await read_nodes(bus)
        online = [n for n in nodes if (now() - n.at).total_seconds() <= OFFLINE_AFTER]
        checks.append(
            Check(
                "workers",
                bool(online),
                f"{len(online)} online ({', '.join(n.node_id for n in online) or 'none'}), "
                f"{len(nodes) - len(online)} offline",
                "" if online else "start one: `bacq worker` (or `bacq devstack`)",
                required=False,
            )
        )
    finally:
        await bus.close()
    return checks


async def _check_kubo(api: str) -> Check:
    try:
        storage = await Storage.connect(api, timeout=5.0)
    except BacqError as exc:
        return Check("kubo", False, f"no kubo RPC API at {api}", str(exc).split("; ", 1)[-1])
    try:
        version: Any = None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                version = await storage._client.core.version()
        number = version.get("Version", "?") if isinstance(version, dict) else "?"
        return Check("kubo", True, f"kubo {number} at {api}")
    finally:
        await storage.close()


def _check_docker(docker: Any) -> Check:
    """(In a thread: docker-py blocks.) ``docker`` is the module, imported by the caller."""
    try:
        if docker is None:
            raise ImportError("docker")
        client = docker.from_env(timeout=5)
        try:
            version = client.version()
        finally:
            client.close()
    except Exception as exc:
        return Check(
            "docker",
            False,
            f"the Docker daemon does not answer ({type(exc).__name__})",
            "start dockerd (scripts/setup.sh does) or set DOCKER_HOST; only workers need it",
            required=False,
        )
    return Check(
        "docker",
        True,
        f"Docker {version.get('Version', '?')} (API {version.get('ApiVersion', '?')})",
        required=False,
    )


async def run_checks(nats_url: str, ipfs_api: str) -> list[Check]:
    # both clients imported here, before the docker thread starts: imports in two threads at
    # once can deadlock (CPython 3.11; seen here, 1 run in 25)
    docker: Any = None
    with contextlib.suppress(ImportError):
        import docker
    import_client()
    nats_checks, kubo, docker_check = await asyncio.gather(
        _bounded(_check_nats(nats_url), lambda: [_stalled("nats", nats_url)]),
        _bounded(_check_kubo(ipfs_api), lambda: _stalled("kubo", ipfs_api)),
        asyncio.to_thread(_check_docker, docker),  # (docker-py's own timeout bounds it)
    )
    return [*nats_checks, kubo, docker_check]


async def _bounded(check: Awaitable[T], stalled: Callable[[], T]) -> T:
    """``check``'s answer, or ``stalled()`` after ``CHECK_TIMEOUT`` seconds: a server that
    accepts a connection and then stalls must not hang the doctor."""
    try:
        return await asyncio.wait_for(check, CHECK_TIMEOUT)
    except TimeoutError:
        return stalled()


def _stalled(name: str, address: str) -> Check:
    return Check(
        name,
        False,
        f"{address} answered no check within {CHECK_TIMEOUT:g} s",
        "check that it runs and is not overloaded, then run `bacq doctor` again",
    )
