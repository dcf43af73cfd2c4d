"""Bad input: a clear error on the CLI, a non-zero exit, and a final state in describe."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bacq.devstack import Devstack
from tests.conftest import run_cli

DEVSTACK = {"workers": 2, "fetch_timeout": 5.0}

GOOD_CID = "bafkreihwsgzybywl3dycrr4cp67z3wgjv62ie3gwrmj6c2ygxvrnlpjqha"


@pytest.mark.parametrize(
    ("args", "field", "hint"),
    [
        (["-v", "notacid:/data", "img"], "inputs.0.cid", "not a valid CID"),
        (["-v", f"{GOOD_CID}:data", "img"], "inputs.0.path", "absolute path"),
        (["-v", f"{GOOD_CID}:/a/../b", "img"], "inputs.0.path", "'..'"),
        (["-o", "stdout:/out", "img"], "outputs.0.name", "reserved"),
        (["-o", "bad name:/out", "img"], "outputs.0.name", "pattern"),
        (["-o", "out:/", "img"], "outputs.0.path", "cannot be a volume path"),
        (["--concurrency", "0", "img"], "concurrency", "greater than or equal to 1"),
        (["--concurrency", "2", "--confidence", "3", "img"], "spec", "cannot exceed concurrency"),
        (["--timeout", "-1", "img"], "timeout", "greater than 0"),
        (["--memory", "lots", "img"], "resources.memory", "write it like 512m"),
        (["--memory", "1k", "img"], "resources.memory", "at least 6m"),
        (["--cpu", "0", "img"], "resources.cpu", "greater than 0"),
        (["-e", "1X=2", "img"], "env", "not a valid variable name"),
        (["--min-bids", "-1", "img"], "min_bids", "greater than or equal to 0"),
        (["-w", "relative", "img"], "working_dir", "absolute path"),
        (["-o", "a:/x", "-o", "b:/x/y", "img"], "spec", "overlap"),
        ([""], "image", "at least 1 character"),
    ],
)
def test_malformed_spec_names_the_field_and_exits_2(args: list[str], field: str, hint: str) -> None:
    # validated before anything is contacted: no devstack needed, nothing submitted
    done = run_cli(None, "run", *args)
    assert done.returncode == 2, done.stderr
    assert field in done.stderr
    assert hint in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-v", "nocolon", "img"], "must look like CID:/path/in/container"),
        (["-o", "nopath", "img"], "must look like NAME:/path/in/container"),
        (["-e", "NOVALUE", "img"], "must look like KEY=VALUE"),
    ],
)
def test_malformed_flags_say_the_expected_form(args: list[str], message: str) -> None:
    done = run_cli(None, "run", *args)
    assert done.returncode == 2
    assert message in done.stderr


def test_unreachable_nats_is_one_clear_line() -> None:
    done = run_cli(None, "list")
    assert done.returncode == 1
    assert "cannot reach NATS at nats://127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr


async def test_requester_validates_specs_it_receives(stack: Devstack) -> None:
    # a client that skips local validation still gets the field named by the requester
    from bacq import subjects
    from bacq.bus import Bus
    from bacq.models import SubmitReply, SubmitRequest

    bus = await Bus.connect(stack.nats.url, name="test", options=stack.client_options())
    try:
        reply = await bus.request(
            subjects.SUBMIT,
            SubmitRequest(spec={"image": "x", "concurrency": 0, "inputs": [{"cid": "x"}]}),
            SubmitReply,
            timeout=10,
        )
    finally:
        await bus.close()
    assert reply.job_id is None
    fields = {p.field for p in reply.problems}
    assert {"concurrency", "inputs.0.cid", "inputs.0.path"} <= fields


def _describe(stack: Devstack, job_id: str) -> dict[str, object]:
    done = run_cli(stack, "describe", job_id, "--output", "json")
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _job_id(stack: Devstack) -> str:
    done = run_cli(stack, "list", "-n", "1", "--output", "json")
    return str(json.loads(done.stdout)[0]["id"])


def _unknown_cid(stack: Devstack, tmp_path: Path) -> str:
    """A valid CID of content that no node has (only hashed, never stored)."""
    secret = tmp_path / "never-added.txt"
    secret.write_text("this content was hashed but never stored anywhere\n")
    from bacq.devstack import find_ipfs

    done = subprocess.run(
        [
            find_ipfs(),
            "--api",
            stack.ipfs_api,
            "add",
            "-Q",
            "--only-hash",
            "--cid-version",
            "1",
            str(secret),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_unknown_cid_fails_the_job_naming_the_input(stack: Devstack, tmp_path: Path) -> None:
    cid = _unknown_cid(stack, tmp_path)
    done = run_cli(
        stack, "run", "-v", f"{cid}:/data.txt", "bacq-test/busybox", "--", "cat", "/data.txt"
    )
    assert done.returncode == 1
    assert f"input {cid} for /data.txt" in done.stdout
    assert "could not fetch" in done.stdout
    job = _describe(stack, _job_id(stack))
    assert job["state"] == "failed"
    assert cid in str(job["reason"])


def test_missing_image_fails_clearly(stack: Devstack) -> None:
    done = run_cli(stack, "run", "bacq-test/no-such-image:1", "--", "true")
    assert done.returncode == 1
    assert "image bacq-test/no-such-image:1 is not on this worker and could not be pulled" in (
        done.stdout
    )
    assert _describe(stack, _job_id(stack))["state"] == "failed"


def test_command_not_found_fails_clearly(stack: Devstack) -> None:
    done = run_cli(stack, "run", "bacq-test/busybox", "--", "no-such-program", "--flag")
    assert done.returncode == 1
    assert "command 'no-such-program' was not found in image bacq-test/busybox" in done.stdout
    job = _describe(stack, _job_id(stack))
    assert job["state"] == "failed"
    executions = job["executions"]
    assert isinstance(executions, dict)
    assert [e["state"] for e in executions.values() if e["state"] != "bid_rejected"] == ["failed"]


def test_non_zero_exit_is_a_result_with_its_exit_code(stack: Devstack, tmp_path: Path) -> None:
    done = run_cli(
        stack, "run", "bacq-test/busybox", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 7"
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "the command exited with code 7" in done.stdout
    job_id = _job_id(stack)
    job = _describe(stack, job_id)
    assert job["state"] == "accepted"
    assert job["exit_code"] == 7
    got = run_cli(stack, "get", job_id, "--output-dir", str(tmp_path / "out"))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "out" / "exitCode").read_text() == "7"
    assert (tmp_path / "out" / "stdout").read_text() == "to-out\n"
    assert (tmp_path / "out" / "stderr").read_text() == "to-err\n"


def test_job_outliving_its_timeout_is_killed_and_fails(stack: Devstack) -> None:
    done = run_cli(
        stack, "run", "--timeout", "2", "bacq-test/busybox", "--", "sleep", "60", timeout=60
    )
    assert done.returncode == 1
    assert "ran longer than the job's timeout of 2s and was killed" in done.stdout
    job_id = _job_id(stack)
    assert _describe(stack, job_id)["state"] == "failed"
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=bacq.job={job_id}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert left.stdout.strip() == ""
