"""NATS users per role (deploy/nats/auth.conf) enforced by a real nats-server; jobs flow with auth.

The devstack here runs nats-server with deploy/nats/nats-server.conf (JetStream, users client,
requester, verifier and worker with their permissions) and every service with its role's user.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
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
from bacq.natsconf import EXAMPLE_NODES, password_var, render
from bacq.states import JobState
from bacq.storage import Storage
from tests.scenarios import BUSYBOX, HELLO_WORLD, setup_storage

ROOT = Path(__file__).parent.parent
# the shipped auth.conf: a user per role, and one per worker node (w1, w2, w3)
PASSWORDS = {
    user: f"{user}-secret-{os.getpid()}"
    for user in ("client", "requester", "verifier", *EXAMPLE_NODES)
}
SERVER_ENV = {password_var(user, node=user in EXAMPLE_NODES): pw for user, pw in PASSWORDS.items()}


def role_env(role: str) -> dict[str, str]:
    return {"BACQ_NATS_USER": role, "BACQ_NATS_PASSWORD": PASSWORDS[role]}


DEVSTACK = {
    "workers": 2,
    "kubo_nodes": 1,
    "nats_args": ["-c", str(ROOT / "deploy" / "nats" / "nats-server.conf")],
    "nats_env": SERVER_ENV,
    "role_env": {user: role_env(user) for user in ("requester", "verifier", "w1", "w2")},
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

        kind = "worker" if role in EXAMPLE_NODES else role
        options = NatsOptions(role=kind, user=role, password=PASSWORDS[role])
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
    worker, watcher = await conn(stack.nats.url, "w1")
    seen: list[bytes] = []

    async def spy(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.data)

    await worker.subscribe(subjects.VERIFY_ALL, cb=spy)
    error = await watcher.violation('Subscription to "bacq.verify.>"')
    assert "permissions violation" in error
    # another worker's result goes by and the refused subscription gets nothing
    other, _ = await conn(stack.nats.url, "w2")
    await other.publish(
        subjects.verify("job1", "w9"), encode(ResultMessage(job_id="job1", node_id="w9", cid="x"))
    )
    await other.flush()
    await worker.flush()
    assert seen == []


async def test_a_worker_cannot_read_results_through_jetstream_or_the_verifiers_inbox(
    stack: Devstack, conn: Callable[[str, str], Awaitable[tuple[NatsClient, Conn]]]
) -> None:
    worker, watcher = await conn(stack.nats.url, "w1")
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
    await client.publish(subjects.bid("w1", "job1"), b"{}")
    await watcher.violation('Publish to "bacq.node.w1.bid.job1"')
    await client.publish(subjects.exec_update("job1", "w1"), b"{}")
    await watcher.violation('Publish to "bacq.exec.job1.w1"')
    await client.subscribe(subjects.assign("w1"))
    await watcher.violation('Subscription to "bacq.node.w1.assign"')
    await client.subscribe(subjects.reveal("w1"))
    await watcher.violation('Subscription to "bacq.node.w1.reveal"')


async def test_a_connection_without_or_with_wrong_credentials_is_refused(stack: Devstack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACQ_NATS_")}
    for extra in ({}, {"BACQ_NATS_USER": "w1", "BACQ_NATS_PASSWORD": "wrong"}):
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
        async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
            jobs = await client.jobs()
    finally:
        for key in ("BACQ_NATS_USER", "BACQ_NATS_PASSWORD"):
            os.environ.pop(key, None)
    assert [job.state for job in jobs] == [JobState.ACCEPTED]
    assert len([e for e in jobs[0].executions.values() if e.result_cid]) == 2

    # what else a client may do: replay and verify the history, read live output and nodes,
    # cancel a job (its worker is told to stop through bacq.node.<node>.cancel)
    def client_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "bacq",
                args[0],
                "--nats-password-file",
                str(password_file),
                *args[1:],
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )

    history = client_cli("history", jobs[0].id, "--verify")
    assert history.returncode == 0, history.stdout + history.stderr
    assert "history verified" in history.stdout
    nodes = client_cli("nodes", "--output", "json")
    assert nodes.returncode == 0, nodes.stderr
    assert {n["node_id"] for n in json.loads(nodes.stdout)} >= {"w1", "w2"}
    logs = client_cli("logs", jobs[0].id)
    assert logs.returncode == 0, logs.stderr
    sleeper = client_cli("run", "--id-only", BUSYBOX, "--", "sleep", "300")
    job_id = sleeper.stdout.strip()
    for _ in range(100):
        described = json.loads(client_cli("describe", job_id, "--output", "json").stdout)
        if any(e["state"] == "running" for e in described["executions"].values()):
            break
        await asyncio.sleep(0.3)
    cancelled = client_cli("cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "stopped on: w" in cancelled.stdout


def test_the_shipped_auth_conf_is_what_natsconf_renders() -> None:
    shipped = (ROOT / "deploy" / "nats" / "auth.conf").read_text()
    assert shipped == render(EXAMPLE_NODES), (
        "regenerate: python -m bacq.natsconf w1 w2 w3 > deploy/nats/auth.conf"
    )


async def test_with_a_user_per_worker_node_no_worker_sends_results_in_anothers_name(
    make_stack: Callable[..., Devstack], tmp_path: Path
) -> None:
    config_dir = tmp_path / "nats-config"
    config_dir.mkdir()
    shutil.copy(ROOT / "deploy" / "nats" / "nats-server.conf", config_dir)
    (config_dir / "auth.conf").write_text(render(["w1", "w2"]))
    passwords = {**PASSWORDS, "w1": "w1-secret", "w2": "w2-secret"}
    nats_env = {
        f"BACQ_{r.upper()}_PASSWORD": PASSWORDS[r] for r in ("client", "requester", "verifier")
    }
    nats_env |= {"BACQ_WORKER_W1_PASSWORD": "w1-secret", "BACQ_WORKER_W2_PASSWORD": "w2-secret"}
    stack = make_stack(
        workers=2,
        kubo_nodes=1,
        nats_args=["-c", str(config_dir / "nats-server.conf")],
        nats_env=nats_env,
        role_env={
            name: {"BACQ_NATS_USER": name, "BACQ_NATS_PASSWORD": passwords[name]}
            for name in ("requester", "verifier", "w1", "w2")
        },
    )
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    w1 = await nats.connect(
        stack.nats.url,
        error_cb=on_error,
        **NatsOptions(role="worker", user="w1", password="w1-secret").connect_kwargs(),
    )
    try:
        forged = ResultMessage(job_id="job1", node_id="w2", cid="bafyforged")
        await w1.publish(subjects.verify("job1", "w2"), encode(forged))
        await w1.publish(subjects.exec_update("job1", "w2"), b"{}")
        await w1.subscribe(subjects.assign("w2"))
        await w1.publish(subjects.verify("job1", "w1"), b"{}")  # its own name: allowed
        await w1.flush()
        expected = [
            'publish to "bacq.verify.job1.w2"',
            'publish to "bacq.exec.job1.w2"',
            'subscription to "bacq.node.w2.assign"',
        ]
        for _ in range(100):
            if all(any(e in error for error in errors) for e in expected):
                break
            await asyncio.sleep(0.1)
        for e in expected:
            assert any(e in error for error in errors), (e, errors)
        assert not any("bacq.verify.job1.w1" in error for error in errors)
    finally:
        await w1.close()
    # and jobs flow with every worker under its own user
    os.environ.update({"BACQ_NATS_USER": "client", "BACQ_NATS_PASSWORD": PASSWORDS["client"]})
    try:
        async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
            job_id = await client.submit(
                {"image": BUSYBOX, "command": ["echo", "hi"], "concurrency": 2, "confidence": 2}
            )
            job = await client.wait(job_id, timeout=180)
    finally:
        for key in ("BACQ_NATS_USER", "BACQ_NATS_PASSWORD"):
            os.environ.pop(key, None)
    assert job.state == JobState.ACCEPTED, job.reason
    assert sorted(job.executions) == ["w1", "w2"]
