"""A 3-server NATS cluster (deploy/nats/cluster.conf) on loopback: losing one server loses no job.

Three real nats-servers route to each other; the requester and the verifier make the BACQ stream
and the buckets with 3 replicas (BACQ_JS_REPLICAS=3); every service lists the three servers. The
test kills the server that leads the BACQ stream, and jobs still go through to a verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest

from bacq import streams, subjects
from bacq.auth import NatsOptions
from bacq.client import Client
from bacq.devstack import Devstack, NatsServer
from bacq.natsconf import EXAMPLE_NODES, password_var
from bacq.states import JobState
from bacq.storage import Storage
from tests.scenarios import BUSYBOX, HELLO_WORLD, setup_storage

ROOT = Path(__file__).parent.parent
# the shipped auth.conf: a user per role and per example worker node (w1, w2, w3)
USERS = ("client", "requester", "verifier", *EXAMPLE_NODES)
PASSWORDS = {user: f"{user}-cluster-{os.getpid()}" for user in USERS}
LEADER_WAIT = 60.0  # seconds the three servers have to elect a JetStream meta leader
JOB_WAIT = 180.0  # seconds a job may take to its verdict (a failover included); a bound, not a goal


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    client_ports, route_ports = _free_ports(3), _free_ports(3)
    routes = {
        f"BACQ_NATS_ROUTE_{i + 1}": f"nats://127.0.0.1:{p}" for i, p in enumerate(route_ports)
    }
    servers = []
    for i in range(3):
        env = {
            "BACQ_NATS_NAME": f"nats-{i + 1}",
            "BACQ_NATS_LISTEN": f"127.0.0.1:{client_ports[i]}",
            "BACQ_NATS_CLUSTER_LISTEN": f"127.0.0.1:{route_ports[i]}",
            **routes,
            **{password_var(u, node=u in EXAMPLE_NODES): pw for u, pw in PASSWORDS.items()},
        }
        servers.append(
            NatsServer(
                tmp_path / f"nats-{i + 1}",
                tmp_path / f"nats-{i + 1}.log",
                port=client_ports[i],
                args=["-c", str(ROOT / "deploy" / "nats" / "cluster.conf")],
                env=env,
            )
        )
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _urls(servers: list[NatsServer]) -> str:
    return ",".join(s.url for s in servers)


async def _wait_for_jetstream(url: str) -> None:
    """The cluster has elected its JetStream meta leader (requester may create the stream)."""
    options = NatsOptions(role="requester", user="requester", password=PASSWORDS["requester"])
    nc = await nats.connect(url.split(","), **options.connect_kwargs())
    try:
        deadline = asyncio.get_running_loop().time() + LEADER_WAIT
        while asyncio.get_running_loop().time() < deadline:
            try:
                await nc.jetstream(timeout=2).account_info()
                return
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.1)
        raise AssertionError(f"the NATS cluster elected no JetStream leader in {LEADER_WAIT:g}s")
    finally:
        await nc.close()


async def _copies(url: str) -> dict[str, int]:
    """The number of copies of every stream and bucket of bacq.streams, by name."""
    options = NatsOptions(role="requester", user="requester", password=PASSWORDS["requester"])
    nc = await nats.connect(url.split(","), **options.connect_kwargs())
    try:
        js = nc.jetstream(timeout=5)
        names = [*streams.STREAMS, *(f"KV_{b}" for b in streams.BUCKETS)]
        return {name: (await js.stream_info(name)).config.num_replicas or 1 for name in names}
    finally:
        await nc.close()


async def _stream_leader(url: str) -> tuple[str, int]:
    options = NatsOptions(role="requester", user="requester", password=PASSWORDS["requester"])
    nc = await nats.connect(url.split(","), **options.connect_kwargs())
    try:
        info = await nc.jetstream(timeout=5).stream_info(subjects.STREAM)
        assert info.cluster is not None
        assert info.cluster.leader is not None
        return info.cluster.leader, 1 + len(info.cluster.replicas or [])
    finally:
        await nc.close()


def _env(role: str) -> dict[str, str]:
    env = {"BACQ_NATS_USER": role, "BACQ_NATS_PASSWORD": PASSWORDS[role]}
    if role in ("requester", "verifier"):
        env["BACQ_JS_REPLICAS"] = "3"
    return env


async def _run_job(client: Client, cid: str) -> JobState:
    job_id = await client.submit(
        {
            "image": BUSYBOX,
            "command": ["sh", "-c", "cat /data/file.txt > /out/copy.txt"],
            "inputs": [{"cid": cid, "path": "/data/file.txt"}],
            "outputs": [{"name": "result", "path": "/out"}],
            "concurrency": 2,
            "confidence": 2,
        },
        timeout=30,
    )
    job = await client.wait(job_id, timeout=JOB_WAIT)
    return job.state


async def test_jobs_continue_when_one_of_three_clustered_nats_servers_dies(
    cluster: list[NatsServer], tmp_path: Path
) -> None:
    url = _urls(cluster)
    await _wait_for_jetstream(url)
    stack = Devstack(
        workers=2,
        kubo_nodes=1,
        nats_url=url,
        role_env={user: _env(user) for user in ("requester", "verifier", "w1", "w2")},
    )
    with stack:
        storage = await Storage.connect(stack.ipfs_api)
        try:
            cids = await setup_storage(storage, tmp_path, {"/data/file.txt": HELLO_WORLD})
        finally:
            await storage.close()
        cid = cids["/data/file.txt"]
        os.environ.update(_env("client"))
        try:
            client = await Client.connect(url)
        finally:
            for key in ("BACQ_NATS_USER", "BACQ_NATS_PASSWORD"):
                os.environ.pop(key, None)
        try:
            assert await _run_job(client, cid) == JobState.ACCEPTED
            leader, copies = await _stream_leader(url)
            assert copies == 3
            # every stream and bucket, live output and node records included, has three copies
            assert set((await _copies(url)).values()) == {3}, await _copies(url)
            victim = next(s for s in cluster if s.env["BACQ_NATS_NAME"] == leader)
            victim.kill()
            survivors = ",".join(s.url for s in cluster if s is not victim)
            for _ in range(2):
                assert await _run_job(client, cid) == JobState.ACCEPTED
            new_leader, _ = await _stream_leader(survivors)
            assert new_leader != leader
        finally:
            with contextlib.suppress(Exception):
                await client.close()
