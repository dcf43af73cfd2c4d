"""The CLI as users and scripts drive it: ids, JSON that parses, a devstack that stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bacq.devstack import Devstack
from tests.conftest import run_cli

DEVSTACK = {"workers": 1}


def test_id_only_prints_just_the_job_id(stack: Devstack) -> None:
    done = run_cli(stack, "run", "--id-only", "bacq-test/busybox", "--", "echo", "hi")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert job_id.startswith("j-")
    assert "\n" not in job_id
    waited = run_cli(stack, "describe", job_id[:8], "--output", "json")  # a prefix will do
    assert json.loads(waited.stdout)["id"] == job_id


def test_run_output_json_holds_the_job_record(stack: Devstack) -> None:
    done = run_cli(
        stack,
        "run",
        "--output",
        "json",
        "--label",
        "team=data",
        "bacq-test/busybox",
        "--",
        "echo",
        "hi",
    )
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["state"] == "accepted"
    assert job["result_cid"].startswith("bafy")
    assert job["spec"]["labels"] == {"team": "data"}
    assert job["spec"]["command"] == ["echo", "hi"]
    (execution,) = [e for e in job["executions"].values() if e["state"] == "verified"]
    assert execution["result_cid"] == job["result_cid"]

    listed = json.loads(run_cli(stack, "list", "--output", "json").stdout)
    assert job["id"] in [j["id"] for j in listed]


def test_describe_shows_per_node_states_and_the_verdict(stack: Devstack) -> None:
    job_id = run_cli(stack, "run", "--id-only", "bacq-test/busybox", "--", "true").stdout.strip()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        shown = run_cli(stack, "describe", job_id)
        if "accepted" in shown.stdout.split("State", 1)[1].splitlines()[0]:
            break
        time.sleep(0.5)
    assert "w1" in shown.stdout
    assert "verified" in shown.stdout
    assert "1 of 1 results agree" in shown.stdout


def test_unknown_job_is_one_clear_line(stack: Devstack) -> None:
    done = run_cli(stack, "describe", "j-doesnotexist")
    assert done.returncode == 1
    assert "no job 'j-doesnotexist'" in done.stderr
    assert "Traceback" not in done.stderr


def test_schema_is_json_schema_of_the_spec() -> None:
    done = run_cli(None, "schema")
    assert done.returncode == 0
    schema = json.loads(done.stdout)
    assert "image" in schema["properties"]


@pytest.mark.devstack
def test_devstack_prints_env_lines_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    with (
        (tmp_path / "devstack.err").open("w") as errors,
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bacq",
                "devstack",
                "--workers",
                "1",
                "--state-dir",
                str(tmp_path / "state"),
            ],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline() for _ in range(4)]
            assert lines[0].startswith("export BACQ_NATS_URL=nats://127.0.0.1:")
            assert lines[1].startswith("export BACQ_IPFS_API=/ip4/127.0.0.1/tcp/")
            # the client's NATS user and its password file (0600, in the state dir)
            assert lines[2] == "export BACQ_NATS_USER=client\n"
            assert lines[3].startswith(f"export BACQ_NATS_PASSWORD_FILE={tmp_path / 'state'}")
            env = dict(line.removeprefix("export ").strip().split("=", 1) for line in lines)
            listed = subprocess.run(
                [sys.executable, "-m", "bacq", "list"],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert listed.returncode == 0, listed.stderr
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=90) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    left = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "state")], capture_output=True, text=True, check=False
    )
    assert left.stdout.strip() == ""
