"""NATS users per role (deploy/nats/auth.conf) enforced by a real nats-server; jobs flow with auth.

The devstack here runs nats-server with deploy/nats/nats-server.conf (JetStream, users client,
requester, verifier and worker with their permissions) and every service with its role's user.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from bacq import subjects
from bacq.auth import NatsOptions
from bacq.client import Client
from bacq.devstack import Devstack
from bacq.models import ResultMessage, encode
from bacq.states import JobState
from bacq.storage import Storage
from tests.scenarios import BUSYBOX, HELLO_WORLD, setup_storage

ROOT = Path(__file__).parent.parent
PASSWORDS = {
    role: f"{role}-secret-{os.getpid()}" for role in ("client", "requester", "verifier", "worker")
}


def role_env(role: str) -> dict[str, str]:
    return {"BACQ_NATS_USER": role, "BACQ_NATS_PASSWORD": PASSWORDS[role]}


DEVSTACK = {
    "workers": 2,
    "kubo_nodes": 1,
    "nats_args": ["-c", str(ROOT / "deploy" / "nats" / "nats-server.conf")],
    "nats_env": {f"BACQ_{role.upper()}_PASSWORD": pw for role, pw in PASSWORDS.items()},
    "role_env": {role: role_env(role) for role in ("requester", "verifier", "worker")},
}


class Conn:
    """A raw nats-py connection as one role, collecting the server's permission errors."""

    def __init__(self) -> None:
        self.nc: NatsClient | None = None
        self.errors: list[str] = []
        self._error = asyncio.Event()

    async def open(self, url: str, role: str) -> NatsClient:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))
            self._error.set()

        options = NatsOptions(role=role, user=role, password=PASSWORDS[role])
        self.nc = await nats.connect(url, error_cb=on_error, **options.connect_kwargs())
        return self.nc

    async def violation(self, text: str) -> str:
        """Wait until the server reports a permissions violation mentioning ``text``."""
        while True:
            for error in self.errors:
                if "permissions violation" in error.lower() and text.lower() in error.lower():
                    return error
            self._error.clear()
            await asyncio.wait_for(self._error.wait(), timeout=10)


@pytest.fixture
async def conn() -> AsyncIterator[Callable[[str, str], Awaitable[tuple[NatsClient, Conn]]]]:
    opened: list[Conn] = []

    async def open_(url: str, role: str) -> tuple[NatsClient, Conn]:
        c = Conn()
        opened.append(c)
        return await c.open(url, role), c

    yield open_
    for c in opened:
        if c.nc is not None:
            await c.nc.close()


async def test_a_worker_cannot_subscribe_to_the_verification_subject(
    stack: Devstack, conn: Callable[[str, str], Awaitable[tuple[NatsClient, Conn]]]
) -> None:
    worker, watcher = await conn(stack.nats.url, "worker")
    seen: list[bytes] = []

    async def spy(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.data)

    await worker.subscribe(subjects.VERIFY_ALL, cb=spy)
    error = await watcher.violation('Subscription to "bacq.verify.>"')
    assert "permissions violation" in error
    # another worker's result goes by and the refused subscription gets nothing
    other, _ = await conn(stack.nats.url, "worker")
    await other.publish(
        subjects.verify("job1", "w9"), encode(ResultMessage(job_id="job1", node_id="w9", cid="x"))
    )
    await other.flush()
    await worker.flush()
    assert seen == []


async def test_a_worker_cannot_read_results_through_jetstream_or_the_verifiers_inbox(
    stack: Devstack, conn: Callable[[str, str], Awaitable[tuple[NatsClient, Conn]]]
) -> None:
    worker, watcher = await conn(stack.nats.url, "worker")
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await worker.jetstream(timeout=2).pull_subscribe(
            subjects.VERIFY_ALL, durable="spy", stream=subjects.STREAM
        )
    await watcher.violation('Publish to "$JS.API.')
    await worker.subscribe("_INBOX.verifier.>")
    await watcher.violation('Subscription to "_INBOX.verifier.>"')


async def test_a_client_cannot_impersonate_a_worker(
    stack: Devstack, conn: Callable[[str, str], Awaitable[tuple[NatsClient, Conn]]]
) -> None:
    client, watcher = await conn(stack.nats.url, "client")
    await client.publish(subjects.verify("job1", "w1"), b"{}")
    await watcher.violation('Publish to "bacq.verify.job1.w1"')
    await client.publish(subjects.bids("job1"), b"{}")
    await watcher.violation('Publish to "bacq.bids.job1"')
    await client.publish(subjects.exec_update("job1", "w1"), b"{}")
    await watcher.violation('Publish to "bacq.exec.job1.w1"')
    await client.subscribe(subjects.assign("w1"))
    await watcher.violation('Subscription to "bacq.node.w1.assign"')
    await client.subscribe(subjects.ANNOUNCE)
    await watcher.violation('Subscription to "bacq.jobs.announce"')


async def test_a_connection_without_or_with_wrong_credentials_is_refused(stack: Devstack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACQ_NATS_")}
    for extra in ({}, {"BACQ_NATS_USER": "worker", "BACQ_NATS_PASSWORD": "wrong"}):
        done = subprocess.run(
            [sys.executable, "-m", "bacq", "list", "--nats", stack.nats.url],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **extra},
            check=False,
        )
        assert done.returncode == 1
        assert "authorization" in done.stderr.lower(), done.stderr


async def test_jobs_flow_end_to_end_with_every_role_authenticated(
    stack: Devstack, tmp_path: Path
) -> None:
    storage = await Storage.connect(stack.ipfs_api)
    try:
        cids = await setup_storage(storage, tmp_path, {"/data/file.txt": HELLO_WORLD})
    finally:
        await storage.close()
    env = {**os.environ, **stack.env(), "COLUMNS": "200", "BACQ_NATS_USER": "client"}
    password_file = tmp_path / "client.password"
    password_file.write_text(PASSWORDS["client"] + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bacq",
            "run",
            "--nats-password-file",
            str(password_file),
            "-v",
            f"{cids['/data/file.txt']}:/data/file.txt",
            "-o",
            "result:/out",
            "--concurrency",
            "2",
            "--confidence",
            "2",
            BUSYBOX,
            "--",
            "sh",
            "-c",
            "cat /data/file.txt > /out/copy.txt",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "accepted" in done.stdout
    # the job record, read with the client's credentials through the bucket
    os.environ.update({"BACQ_NATS_USER": "client", "BACQ_NATS_PASSWORD": PASSWORDS["client"]})
    try:
        async with await Client.connect(stack.nats.url) as client:
            jobs = await client.jobs()
    finally:
        for key in ("BACQ_NATS_USER", "BACQ_NATS_PASSWORD"):
            os.environ.pop(key, None)
    assert [job.state for job in jobs] == [JobState.ACCEPTED]
    assert len([e for e in jobs[0].executions.values() if e.result_cid]) == 2
