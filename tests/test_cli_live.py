"""The CLI against a running devstack, as a person sees it: the live view in a real terminal (tmux),
Ctrl-C, live logs, nodes, job files, and the JSON/YAML outputs with their documented keys."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from bacq.bus import Bus
from bacq.devstack import Devstack
from bacq.logs import LogStreamer, read_logs
from tests.conftest import run_cli

DEVSTACK = {"workers": 2}
WAIT = 120.0  # seconds to wait for what a person would see; a deadline, not a speed goal

JOB_KEYS = {
    "id",
    "spec",
    "state",
    "reason",
    "created_at",
    "updated_at",
    "executions",
    "result_cid",
    "exit_code",
    "event_seq",
    "last_hash",
    "idempotency_key",
    "deadline",
}
EXECUTION_KEYS = {
    "node_id",
    "state",
    "updated_at",
    "detail",
    "error",
    "exit_code",
    "result_cid",
    "assigned_at",
    "fuel_used",
}
NODE_KEYS = {
    "node_id",
    "online",
    "labels",
    "cpu",
    "memory",
    "max_jobs",
    "running",
    "running_jobs",
    "last_heartbeat",
    "seconds_since_heartbeat",
    "verified",
    "rejected",
    "quarantined",
    "offences",
    "forged",
    "malformed",
    "bad_reveals",
}


# -- a real terminal -------------------------------------------------------------------------------
class Terminal:
    """A tmux session running one shell command line in a 120 by 40 terminal.

    Each terminal has its own tmux server (socket ``-L``), apart from anyone else's tmux.
    """

    def __init__(self, stack: Devstack, command: str) -> None:
        self.name = f"bacq-test-{uuid.uuid4().hex[:8]}"
        self.tmux = ["tmux", "-L", self.name]
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in stack.env().items())
        line = f"env {env} {command}; echo EXIT=$?; sleep 600"
        subprocess.run(
            [*self.tmux, "new-session", "-d", "-s", self.name, "-x", "120", "-y", "40", line],
            check=True,
        )

    def screen(self) -> str:
        done = subprocess.run(
            [*self.tmux, "capture-pane", "-p", "-t", self.name],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    def wait_for(self, seen: Callable[[str], bool], what: str) -> str:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            screen = self.screen()
            if seen(screen):
                return screen
            time.sleep(0.3)
        raise AssertionError(f"never saw {what}; the screen was:\n{self.screen()}")

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", self.name, *keys], check=True)

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], check=False)  # this terminal's own server


@pytest.fixture
def terminal(stack: Devstack) -> Iterator[Callable[[str], Terminal]]:
    opened: list[Terminal] = []

    def open_terminal(command: str) -> Terminal:
        term = Terminal(stack, command)
        opened.append(term)
        return term

    try:
        yield open_terminal
    finally:
        for term in opened:
            term.close()


def bacq(*args: str) -> str:
    return shlex.join([sys.executable, "-m", "bacq", *args])


def wait_final(stack: Devstack, job_id: str) -> dict[str, object]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        job: dict[str, object] = json.loads(
            run_cli(stack, "describe", job_id, "--output", "json").stdout
        )
        if job["state"] in ("accepted", "void", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end")


# -- the live view -------------------------------------------------------------------------------
def test_live_view_shows_a_line_per_worker_then_the_verdict_and_the_get_hint(
    stack: Devstack, terminal: Callable[[str], Terminal]
) -> None:
    term = terminal(
        bacq(
            "run",
            "--concurrency",
            "2",
            "--confidence",
            "2",
            "bacq-test/busybox",
            "--",
            "sh",
            "-c",
            "echo hello-from-the-job; echo warn-on-stderr >&2; sleep 6; echo the-last-line",
        )
    )

    def both_running(screen: str) -> bool:
        return all(re.search(rf"\b{w}\s+running\b", screen) for w in ("w1", "w2"))

    during = term.wait_for(both_running, "both workers running")
    assert re.search(r"job j-[0-9a-f]+ .*running.*elapsed \d+:\d\d", during), during
    assert "Ctrl-C detaches; the job goes on." in during
    assert "EXIT=" not in during

    after = term.wait_for(lambda s: "EXIT=" in s, "the end of bacq run")
    assert "EXIT=0" in after, after
    assert re.search(r"\bw1\s+verified\b", after), after
    assert re.search(r"\bw2\s+verified\b", after), after
    assert "accepted: 2 of 2 results agree" in after
    assert re.search(r"exit code\s+0", after), after
    assert re.search(r"result CID\s+bafy", after), after
    assert "hello-from-the-job" in after
    assert "the-last-line" in after
    assert "warn-on-stderr" in after
    job_id = re.search(r"job (j-[0-9a-f]+)", after).group(1)  # type: ignore[union-attr]
    assert f"bacq get {job_id} --output-dir {job_id}" in after
    assert "Traceback" not in after


def test_live_view_of_a_failing_command_exits_3_and_says_so(
    stack: Devstack, terminal: Callable[[str], Terminal]
) -> None:
    term = terminal(bacq("run", "bacq-test/busybox", "--", "sh", "-c", "echo no-luck; exit 4"))
    after = term.wait_for(lambda s: "EXIT=" in s, "the end of bacq run")
    assert "EXIT=3" in after, after
    assert "the command exited with code 4" in after
    assert "no-luck" in after


def test_ctrl_c_detaches_and_says_the_job_goes_on(
    stack: Devstack, terminal: Callable[[str], Terminal]
) -> None:
    term = terminal(bacq("run", "bacq-test/busybox", "--", "sh", "-c", "sleep 5; echo survived"))
    screen = term.wait_for(lambda s: re.search(r"\bw\d\s+running\b", s) is not None, "running")
    job_id = re.search(r"job (j-[0-9a-f]+)", screen).group(1)  # type: ignore[union-attr]
    term.keys("C-c")
    after = term.wait_for(lambda s: "EXIT=" in s, "bacq run to stop")
    assert "EXIT=130" in after, after
    assert f"detached: job {job_id} goes on" in after
    assert "Traceback" not in after
    job = wait_final(stack, job_id)
    assert job["state"] == "accepted"  # it went on without us


def test_piped_run_prints_plain_progress_lines_and_no_animation(stack: Devstack) -> None:
    # (a step is reported once it lasts PROGRESS_LINGER: this one runs for a second)
    done = run_cli(stack, "run", "bacq-test/busybox", "--", "sh", "-c", "sleep 1; echo piped")
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout + done.stderr  # no colours, no cursor movement
    assert re.search(r"^  w\d: running", done.stderr, re.M), done.stderr
    assert "job accepted" in done.stderr
    assert "accepted: 1 of 1 results agree" in done.stdout
    assert "piped" in done.stdout
    assert "bacq get j-" in done.stdout


# -- logs ----------------------------------------------------------------------------------------
def test_logs_follow_streams_a_running_job_then_ends_with_it(stack: Devstack) -> None:
    job_id = run_cli(
        stack,
        "run",
        "--id-only",
        "bacq-test/busybox",
        "--",
        "sh",
        "-c",
        "echo first-line; echo on-stderr >&2; sleep 12; echo last-line",
    ).stdout.strip()
    with subprocess.Popen(
        [sys.executable, "-m", "bacq", "logs", "-f", job_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **stack.env()},
    ) as follower:
        try:
            assert follower.stdout is not None
            assert follower.stdout.readline() == "first-line\n"
            # it arrived while the job still runs: streamed live, not read from the results
            state = json.loads(run_cli(stack, "describe", job_id, "--output", "json").stdout)
            assert state["state"] in ("pending", "bidding", "running")
            rest, errors = follower.communicate(timeout=WAIT)
        finally:
            if follower.poll() is None:
                follower.kill()
    assert follower.returncode == 0, errors
    assert rest == "last-line\n"
    assert "on-stderr" in errors
    # finished: the same output, from the results in IPFS, stdout and stderr apart
    done = run_cli(stack, "logs", job_id)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "first-line\nlast-line\n"
    assert done.stderr == "on-stderr\n"


def test_logs_of_several_workers_are_prefixed_by_node(stack: Devstack) -> None:
    job_id = run_cli(
        stack, "run", "--id-only", "--concurrency", "2", "bacq-test/busybox", "--", "echo", "hi"
    ).stdout.strip()
    wait_final(stack, job_id)
    live = run_cli(stack, "logs", job_id, "--node", "w2")
    assert live.stdout == "hi\n"
    pieces = [
        json.loads(line)
        for line in run_cli(stack, "logs", job_id, "--output", "json").stdout.splitlines()
    ]
    assert pieces[0]["node_id"] in ("w1", "w2")
    assert [(p["stream"], p["text"]) for p in pieces] == [("stdout", "hi\n")]
    assert all(set(p) == {"node_id", "stream", "text"} for p in pieces)
    unknown = run_cli(stack, "logs", job_id, "--node", "w9")
    assert unknown.returncode == 2
    assert "w1, w2" in unknown.stderr


def test_logs_of_a_job_killed_at_its_timeout_show_what_it_printed(stack: Devstack) -> None:
    done = run_cli(
        stack,
        "run",
        "--timeout",
        "3",
        "bacq-test/busybox",
        "--",
        "sh",
        "-c",
        "echo before-the-deadline; sleep 60",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    job_id = re.search(r"(j-[0-9a-f]+)", done.stdout).group(1)  # type: ignore[union-attr]
    logs = run_cli(stack, "logs", job_id)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == "before-the-deadline\n"  # no results in IPFS: the live output
    assert "left no results; live output shown" in logs.stderr


async def test_live_output_is_bounded_in_size_and_says_where_the_rest_is(stack: Devstack) -> None:
    # a worker's connection streams (as w1, its NATS user), a client's reads
    worker = await Bus.connect(
        stack.nats.url, name="bacq-worker-w1", options=stack.nats_options("w1")
    )
    bus = await Bus.connect(stack.nats.url, name="test-logs", options=stack.client_options())
    try:
        streamer = LogStreamer(worker, "j-bounded", "w1", interval=0.01, max_bytes=40_000)
        streamer.start()
        for _ in range(100):
            streamer.feed("stdout", b"x" * 999 + b"\n")
        await asyncio.sleep(0.5)
        streamer.feed("stdout", b"after the cap\n")
        await streamer.close()
        chunks = [c async for c in read_logs(bus, "j-bounded")]
    finally:
        await bus.close()
        await worker.close()
    text = "".join(c.text for c in chunks if c.stream == "stdout")
    assert text.count("x") <= 40_000
    assert "live output of stdout stops after 40000 bytes" in text
    assert "bacq logs j-bounded" in text
    assert "after the cap" not in text
    assert all(len(c.text.encode()) <= 17 * 1024 for c in chunks)
    assert [c.eof for c in chunks if c.stream == "stdout"][-1] is True


# -- nodes, list, describe, create: machine outputs -----------------------------------------------
def test_nodes_lists_workers_with_capacity_heartbeat_and_verification_record(
    stack: Devstack,
) -> None:
    job_id = run_cli(stack, "run", "--id-only", "bacq-test/busybox", "--", "true").stdout.strip()
    wait_final(stack, job_id)
    for fmt, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        done = run_cli(stack, "nodes", "--output", fmt)
        assert done.returncode == 0, done.stderr
        rows = {r["node_id"]: r for r in load(done.stdout)}
        assert set(rows) == {"w1", "w2"}
        for row in rows.values():
            assert set(row) == NODE_KEYS
            assert row["online"] is True
            assert row["max_jobs"] == 4
        assert sum(r["verified"] for r in rows.values()) >= 1
    table = run_cli(stack, "nodes")
    assert re.search(r"^w1\s+online", table.stdout, re.M), table.stdout
    assert "HEARTBEAT" in table.stdout


def test_list_filters_and_formats_hold_the_documented_keys(stack: Devstack) -> None:
    tag = uuid.uuid4().hex[:6]
    job_id = run_cli(
        stack, "run", "--id-only", "--label", f"tag={tag}", "bacq-test/busybox", "--", "true"
    ).stdout.strip()
    wait_final(stack, job_id)
    listed = json.loads(run_cli(stack, "list", "--label", f"tag={tag}", "--output", "json").stdout)
    assert [j["id"] for j in listed] == [job_id]
    assert set(listed[0]) == JOB_KEYS
    for execution in listed[0]["executions"].values():
        assert set(execution) == EXECUTION_KEYS
    as_yaml = yaml.safe_load(run_cli(stack, "list", "--output", "yaml", "-n", "1").stdout)
    assert len(as_yaml) == 1
    assert set(as_yaml[0]) == JOB_KEYS
    none = json.loads(
        run_cli(
            stack, "list", "--label", f"tag={tag}", "--state", "void,failed", "--output", "json"
        ).stdout
    )
    assert none == []
    recent = json.loads(run_cli(stack, "list", "--since", "1h", "--output", "json").stdout)
    assert job_id in [j["id"] for j in recent]
    wide = run_cli(stack, "list", "--wide", "--label", f"tag={tag}")
    assert "REASON" in wide.stdout
    assert f"tag={tag}" in wide.stdout
    described = yaml.safe_load(run_cli(stack, "describe", job_id, "--output", "yaml").stdout)
    assert set(described) == JOB_KEYS
    assert described["state"] == "accepted"


def test_create_submits_a_job_file_and_wait_follows_it(stack: Devstack, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "# a job file, as `bacq run --dry-run` writes it\n"
        "image: bacq-test/busybox\n"
        "command: [sh, -c, 'echo from-a-file']\n"
        "labels: {origin: file}\n"
    )
    done = run_cli(stack, "create", "-f", str(path), "--wait")
    assert done.returncode == 0, done.stderr
    assert "from-a-file" in done.stdout
    job_id = run_cli(stack, "create", "-f", str(path)).stdout.strip()
    assert re.fullmatch(r"j-[0-9a-f]+", job_id)
    assert wait_final(stack, job_id)["state"] == "accepted"


def test_bash_completes_job_ids_from_the_network(stack: Devstack, tmp_path: Path) -> None:
    job_id = run_cli(stack, "run", "--id-only", "bacq-test/busybox", "--", "true").stdout.strip()
    script = tmp_path / "bacq.bash"
    script.write_text(run_cli(None, "completion", "bash").stdout)
    probe = (
        f"source {script}; COMP_WORDS=(bacq logs {job_id[:4]}); COMP_CWORD=2; "
        f"COMP_LINE='bacq logs {job_id[:4]}'; COMP_POINT=${{#COMP_LINE}}; "
        f"_shtab_bacq bacq {job_id[:4]} logs; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    done = subprocess.run(
        ["bash", "-c", probe],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, **stack.env(), "PATH": path},
    )
    assert job_id in done.stdout.split(), done.stdout + done.stderr


def test_doctor_on_a_devstack_is_all_good(stack: Devstack) -> None:
    done = run_cli(stack, "doctor", "--output", "json")
    assert done.returncode == 0, done.stdout
    report = json.loads(done.stdout)
    assert report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["nats"]["ok"]
    assert "nats-server 2." in checks["nats"]["detail"]
    assert checks["kubo"]["ok"]
    assert "kubo 0.28.0" in checks["kubo"]["detail"]
    assert checks["requester"]["ok"]
    assert checks["workers"]["ok"]
