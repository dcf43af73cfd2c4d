"""The devstack itself: a NATS user per process by default, readiness by an explicit call
(whatever the log level), and a stop that leaves nothing behind (state dir, job containers).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from bacq.client import Client
from bacq.devstack import Devstack
from bacq.errors import NatsUnavailable
from bacq.states import JobState
from bacq.worker.executor import listed_name
from tests.conftest import run_cli
from tests.scenarios import BUSYBOX


def _containers(work_dir: Path) -> list[str]:
    client = docker.from_env()
    try:
        # sparse: the listing alone, no inspection of each (a container removed between the
        # two would fail the inspection)
        found = client.containers.list(
            all=True, sparse=True, filters={"label": f"bacq.work_dir={work_dir.resolve()}"}
        )
        return [listed_name(c) for c in found]
    finally:
        client.close()


async def test_every_process_has_its_own_nats_user_and_later_workers_get_one_too(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=1, kubo_nodes=1)
    env = stack.env()
    assert env["BACQ_NATS_USER"] == "client"
    for user in ("client", "requester", "verifier", "w1"):
        mode = stat.S_IMODE(stack.password_file(user).stat().st_mode)
        assert mode == 0o600, (user, oct(mode))
    assert stat.S_IMODE(stack.nats_config.stat().st_mode) == 0o600
    # the printed lines tell a user how the client authenticates
    assert f"export BACQ_NATS_PASSWORD_FILE={stack.password_file('client')}" in stack.env_lines()
    # without credentials, or as another user with the client's password: refused
    bare = {k: v for k, v in os.environ.items() if not k.startswith("BACQ_NATS_")}
    done = subprocess.run(
        [sys.executable, "-m", "bacq", "list", "--nats", stack.nats.url],
        capture_output=True,
        text=True,
        timeout=60,
        env=bare,
        check=False,
    )
    assert done.returncode == 1
    assert "authorization" in done.stderr.lower(), done.stderr
    wrong = stack.client_options()
    with pytest.raises(NatsUnavailable, match="authorization"):
        await Client.connect(
            stack.nats.url,
            options=type(wrong)(role="client", user="w1", password=wrong.password),
        )
    # a worker added later gets its own user (the server reloads its config) and takes jobs
    stack.add_worker(1)
    assert stack.password_file("w2").exists()
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit(
            {"image": BUSYBOX, "command": ["echo", "hi"], "concurrency": 2, "confidence": 2}
        )
        job = await client.wait(job_id, timeout=180)
    assert job.state == JobState.ACCEPTED, job.reason
    assert sorted(job.executions) == ["w1", "w2"]
    # and the CLI works with nothing but the printed environment
    listed = run_cli(stack, "list", "--output", "json")
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)] == [job_id]


def test_services_started_with_log_level_warning_report_ready(
    make_stack: Callable[..., Devstack],
) -> None:
    quiet = {"BACQ_LOG_LEVEL": "WARNING"}
    stack = make_stack(
        workers=1,
        kubo_nodes=1,
        role_env={"requester": quiet, "verifier": quiet, "worker": quiet},
    )
    for name in ("requester", "verifier", "w1"):
        assert b'"service.ready"' not in stack.services[name].log_path.read_bytes()
    done = run_cli(stack, "run", BUSYBOX, "--", "echo", "quiet")
    assert done.returncode == 0, done.stderr


@pytest.mark.devstack
def test_stop_removes_the_state_dir_and_the_containers_of_a_killed_worker() -> None:
    stack = Devstack(workers=1, kubo_nodes=1)
    state_dir = stack.state_dir
    work_dir = stack.worker_dir("w1")
    try:
        stack.start()
        job_id = run_cli(stack, "run", "--id-only", BUSYBOX, "--", "sleep", "300").stdout.strip()
        assert job_id
        deadline = time.monotonic() + 120
        while not _containers(work_dir):
            assert time.monotonic() < deadline, "the job's container never started"
            time.sleep(0.2)
        stack.kill("w1")  # kill -9: the worker cannot remove its container
        assert _containers(work_dir)
    finally:
        stack.stop()
    assert _containers(work_dir) == []
    assert not state_dir.exists()


@pytest.mark.devstack
def test_ctrl_c_on_bacq_devstack_leaves_no_state_dir() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bacq", "devstack", "--workers", "1", "--kubo-nodes", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        lines = [proc.stdout.readline() for _ in range(4)]  # URL, API, user, password file
        assert lines[2].strip() == "export BACQ_NATS_USER=client", lines
        password_file = Path(lines[3].strip().split("=", 1)[1])
        state_dir = password_file.parent.parent
        assert state_dir.is_dir()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert not state_dir.exists()
