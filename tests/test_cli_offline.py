"""The CLI without a network: job files and their checks, dry runs, completion, versions, errors."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bacq.cli import parse_since
from bacq.jobfile import JobFileError, parse_job_text
from bacq.models import Execution, JobRecord, NodeInfo
from bacq.nodes import node_rows
from bacq.spec import JobSpec
from bacq.states import ExecState, JobState
from tests.conftest import run_cli

GOOD_CID = "bafkreie7q3iidccmpvszul7kudcvvuavuo7u6gzlbobczuk5nqk3b4akba"


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``bacq ARGS`` with nothing reachable (a closed port for NATS and kubo)."""
    if stdin is None:
        return run_cli(None, *args)
    return subprocess.run(
        [sys.executable, "-m", "bacq", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "BACQ_NATS_URL": "nats://127.0.0.1:1",
            "BACQ_IPFS_API": "/ip4/127.0.0.1/tcp/1",
        },
    )


# -- validate: each kind of bad file, with the field and its line --------------------------------
BAD_FILES = {
    "not_yaml": ("image: busybox\ncommand: [echo, hi\n", "line 3", "is not valid YAML or JSON"),
    # a list of jobs is a file of many jobs (tests/test_cli_bulk_offline.py); its items must be jobs
    "a_list": ("- just text\n", "line 1", "not a mapping of job fields"),
    "empty": ("\n\n", None, "is empty"),
    "unknown_field": (
        "image: busybox\ncomand: [echo]\n",
        "line 2",
        "comand: unknown field; remove it or fix its name (did you mean `command`?)",
    ),
    "missing_image": ("command: [echo]\n", "line 1", "image: required field missing"),
    "bad_cid": (
        f"image: busybox\ninputs:\n  - cid: {GOOD_CID}\n    path: /a\n  - cid: nope\n"
        "    path: /b\n",
        "line 5",
        "inputs.1.cid: 'nope' is not a valid CID",
    ),
    "wrong_type": (
        "image: busybox\nconcurrency: lots\n",
        "line 2",
        "concurrency: Input should be a valid integer",
    ),
    "relative_path": (
        "image: busybox\noutputs:\n  - name: out\n    path: out\n",
        "line 4",
        "outputs.0.path: 'out' must be an absolute path",
    ),
    "bad_memory": (
        "image: busybox\nresources:\n  cpu: 1\n  memory: 1k\n",
        "line 4",
        "resources.memory: memory must be at least 6m",
    ),
    "json_bad_value": (
        '{\n  "image": "busybox",\n  "timeout": -5\n}\n',
        "line 3",
        "timeout: Input should be greater than 0",
    ),
    "json_syntax": ('{\n  "image": "busybox",\n  "timeout": 5,,\n}\n', "line 3", "not valid"),
    "cross_field": (
        "image: busybox\nconcurrency: 1\nconfidence: 2\n",
        "line 1",
        "confidence (2) cannot exceed concurrency (1)",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_validate_rejects_each_kind_of_bad_file_naming_field_and_line(
    kind: str, tmp_path: Path
) -> None:
    text, line, message = BAD_FILES[kind]
    path = tmp_path / ("job.json" if kind.startswith("json") else "job.yaml")
    path.write_text(text)
    done = cli("validate", "-f", str(path))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    if line is not None:
        assert f"{path}:{line.removeprefix('line ')}:" in done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(JobFileError) as caught:
        parse_job_text(text)
    shown = str(caught.value)
    assert message in shown
    if line is not None:
        assert line in shown


def test_validate_reads_stdin_and_accepts_a_good_file() -> None:
    text = f"image: busybox\ncommand: [cat, /in/x]\ninputs:\n  - cid: {GOOD_CID}\n    path: /in\n"
    done = cli("validate", "-f", "-", stdin=text)
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout
    as_json = json.loads(cli("validate", "-f", "-", "--output", "json", stdin=text).stdout)
    assert as_json["valid"] is True
    assert as_json["spec"]["inputs"] == [{"cid": GOOD_CID, "path": "/in"}]


def test_validate_of_a_missing_file_says_so_in_one_line(tmp_path: Path) -> None:
    done = cli("validate", "-f", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "no such file" in done.stderr


def test_create_refuses_a_bad_file_before_any_connection(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("image: busybox\ntimeout: soon\n")
    done = cli("create", "-f", str(path))
    assert done.returncode == 2
    assert f"{path}:2: timeout" in done.stderr
    assert "NATS" not in done.stderr  # the file is checked first


def test_run_dry_run_prints_a_job_file_that_create_and_validate_read_back() -> None:
    done = cli(
        "run",
        "--dry-run",
        "-v",
        f"{GOOD_CID}:/in",
        "-o",
        "out:/out",
        "--concurrency",
        "3",
        "--confidence",
        "2",
        "--label",
        "team=data",
        "--memory",
        "1g",
        "bacq-test/busybox",
        "--",
        "sh",
        "-c",
        "cp /in /out/x",
    )
    assert done.returncode == 0, done.stderr
    job = yaml.safe_load(done.stdout)
    assert job["image"] == "bacq-test/busybox"
    assert job["command"] == ["sh", "-c", "cp /in /out/x"]
    assert job["concurrency"] == 3
    assert job["resources"]["memory"] == 1024**3
    spec = parse_job_text(done.stdout)
    assert spec == JobSpec.model_validate(job)
    checked = cli("validate", "-f", "-", stdin=done.stdout)
    assert checked.returncode == 0, checked.stderr
    again = cli("create", "-f", "-", "--dry-run", stdin=done.stdout)
    assert yaml.safe_load(again.stdout) == job


def test_run_dry_run_with_a_bad_spec_names_the_field() -> None:
    done = cli("run", "--dry-run", "--concurrency", "0", "bacq-test/busybox")
    assert done.returncode == 2
    assert "concurrency" in done.stderr
    assert "Traceback" not in done.stderr


# -- completion ---------------------------------------------------------------------------------
def test_bash_completion_script_is_valid_bash_and_knows_the_commands(tmp_path: Path) -> None:
    done = cli("completion", "bash")
    assert done.returncode == 0, done.stderr
    script = tmp_path / "bacq.bash"
    script.write_text(done.stdout)
    checked = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    # complete "bacq lo" in a real bash with the script loaded
    probe = (
        f"source {script}; COMP_WORDS=(bacq lo); COMP_CWORD=1; COMP_LINE='bacq lo'; "
        "COMP_POINT=${#COMP_LINE}; _shtab_bacq bacq lo bacq; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    completed = subprocess.run(
        ["bash", "-c", probe], capture_output=True, text=True, check=False, timeout=30
    )
    assert {"logs"} <= set(completed.stdout.split()), completed.stderr


def test_zsh_completion_script_declares_the_commands_and_options() -> None:
    done = cli("completion", "zsh")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("#compdef bacq")
    for word in ("run", "logs", "nodes", "validate", "--output", "--follow"):
        assert word in done.stdout
    # job ids complete from the network, through a function the script defines
    assert "_bacq_job_ids() {" in done.stdout
    # defined, then used by describe, logs, get, cancel and history
    assert done.stdout.count("_bacq_job_ids") >= 6


def test_completion_for_an_unknown_shell_is_a_usage_error() -> None:
    done = cli("completion", "fish")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


# -- version, errors ----------------------------------------------------------------------------
def test_version_prints_json_and_yaml_with_the_documented_keys() -> None:
    for fmt, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        done = cli("version", "--output", fmt)
        assert done.returncode == 0, done.stderr
        versions = load(done.stdout)
        assert {"bacq", "python", "nats-py", "aioipfs", "docker", "pydantic", "rich"} <= set(
            versions
        )
    assert cli("version").stdout.startswith("bacq ")


def test_unreachable_nats_is_one_line_without_traceback_and_debug_shows_it() -> None:
    done = cli("list")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot reach NATS at nats://127.0.0.1:1")
    assert "bacq devstack" in lines[0]
    debug = cli("--debug", "list")
    assert "Traceback" in debug.stderr
    assert "NatsUnavailable" in debug.stderr
    after = cli("list", "--debug")  # also accepted after the command
    assert "Traceback" in after.stderr


def test_doctor_says_what_is_down_and_how_to_fix_it() -> None:
    done = cli("doctor", "--output", "json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) >= {"nats", "kubo", "docker"}
    for name in ("nats", "kubo"):
        assert checks[name]["ok"] is False
        assert checks[name]["fix"]
        assert set(checks[name]) == {"name", "ok", "detail", "fix", "required"}
    shown = cli("doctor")
    assert "fix:" in shown.stdout
    assert "Traceback" not in shown.stderr


def test_bad_arguments_are_usage_errors_in_one_line() -> None:
    for args, words in [
        (("list", "--state", "bogus"), "not a job state"),
        (("list", "--since", "yesterday"), "neither a duration"),
        (("list", "--output", "xml"), "invalid choice"),
        (("run", "-v", "nocolon", "bacq-test/busybox"), "must look like CID:/path"),
    ]:
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert words in done.stderr
        assert "Traceback" not in done.stderr


# -- pure helpers ---------------------------------------------------------------------------------
def test_since_takes_durations_and_dates() -> None:
    at = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.UTC)
    assert parse_since("90s", at) == at - dt.timedelta(seconds=90)
    assert parse_since("2h", at) == at - dt.timedelta(hours=2)
    assert parse_since("1w", at) == at - dt.timedelta(days=7)
    assert parse_since("2026-01-30T00:00+00:00", at) == dt.datetime(2026, 1, 30, tzinfo=dt.UTC)


def test_node_rows_count_verdicts_and_running_jobs_per_node() -> None:
    at = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.UTC)
    spec = JobSpec(image="busybox")

    def job(job_id: str, **states: ExecState) -> JobRecord:
        executions = {n: Execution(node_id=n, state=s) for n, s in states.items()}
        return JobRecord(id=job_id, spec=spec, executions=executions)

    jobs = [
        job("j-1", w1=ExecState.VERIFIED, w2=ExecState.REJECTED),
        job("j-2", w1=ExecState.VERIFIED, w2=ExecState.VERIFIED),
        job("j-3", w1=ExecState.RUNNING, w2=ExecState.BID_REJECTED),
        job("j-4", w3=ExecState.REJECTED),
    ]
    nodes = [
        NodeInfo(node_id="w1", cpu=2, memory=1024, max_jobs=4, running=1, at=at),
        NodeInfo(node_id="w2", cpu=2, memory=1024, max_jobs=4, running=0, at=at),
    ]
    rows = {r["node_id"]: r for r in node_rows(nodes, jobs, at + dt.timedelta(seconds=60))}
    assert rows["w1"]["verified"] == 2
    assert rows["w1"]["running_jobs"] == ["j-3"]
    assert rows["w2"]["verified"] == 1
    assert rows["w2"]["rejected"] == 1
    assert rows["w1"]["online"] is False  # a minute without heartbeat
    assert rows["w3"]["last_heartbeat"] is None  # known from the jobs only
    assert rows["w3"]["online"] is False
    fresh = node_rows(nodes, jobs, at + dt.timedelta(seconds=3))
    assert fresh[0]["online"] is True


# -- what the live view and the verdict draw (pure rendering) ------------------------------------
def _render(renderable: object) -> str:
    from rich.console import Console

    console = Console(width=120, record=True, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_live_view_names_every_worker_state_a_person_cares_about() -> None:
    from bacq.render import LiveView

    spec = JobSpec(image="busybox")
    job = JobRecord(
        id="j-1",
        spec=spec,
        executions={
            "w1": Execution(node_id="w1", state=ExecState.BID),
            "w2": Execution(node_id="w2", state=ExecState.DOWNLOADING, detail="1 input(s)"),
            "w3": Execution(node_id="w3", state=ExecState.PUBLISHING),
            "w4": Execution(node_id="w4", state=ExecState.BID_REJECTED),
        },
    )
    view = LiveView("j-1")
    assert "waiting for bids" in _render(view)
    view.update(job)
    screen = _render(view)
    assert re.search(r"w1\s+bidding", screen)
    assert re.search(r"w2\s+downloading inputs\s+\d:\d\d\s+1 input\(s\)", screen)
    assert re.search(r"w3\s+publishing", screen)
    assert re.search(r"w4\s+not chosen", screen)
    assert "Ctrl-C detaches; the job goes on." in screen
    job.state = JobState.ACCEPTED
    job.executions["w2"] = Execution(node_id="w2", state=ExecState.VERIFIED, exit_code=0)
    job.executions["w3"] = Execution(
        node_id="w3", state=ExecState.REJECTED, exit_code=0, result_cid="bafyother" * 3
    )
    screen = _render(view)
    assert re.search(r"w2\s+verified\s+\d:\d\d\s+exit code 0", screen)
    assert re.search(r"w3\s+rejected\s+\d:\d\d\s+outvoted", screen)
    assert "Ctrl-C" not in screen  # over: nothing to detach from


def test_verdict_of_a_void_job_names_the_reason_and_where_to_look() -> None:
    from rich.console import Console

    from bacq.render import render_verdict

    job = JobRecord(
        id="j-2",
        spec=JobSpec(image="busybox"),
        state=JobState.VOID,
        reason="results disagree: no two alike",
        executions={"w1": Execution(node_id="w1", state=ExecState.FAILED, error="image gone")},
    )
    console = Console(width=120, record=True, color_system=None, file=io.StringIO())
    render_verdict(console, job)
    text = console.export_text()
    assert "void: results disagree: no two alike" in text
    assert "w1: image gone" in text
    assert "bacq describe j-2" in text
    assert "bacq get" not in text


def test_a_closed_output_pipe_ends_the_command_quietly_with_141() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line (`bacq ... | head -0`)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bacq", "completion", "bash"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert done.stderr == ""  # no "unexpected BrokenPipeError", no "Exception ignored"


def test_the_completion_script_names_no_outside_site() -> None:
    for shell in ("bash", "zsh"):
        done = run_cli(None, "completion", shell)
        assert done.returncode == 0, done.stderr
        assert "://" not in done.stdout


def test_run_python_with_an_option_after_python_says_where_options_go(tmp_path: Path) -> None:
    done = run_cli(None, "run", "python", "-v", "bafyinput:/in", "count.py", cwd=tmp_path)
    assert done.returncode == 2
    assert "-v is not a file; options go before `python`" in done.stderr
    assert "kubo" not in done.stderr  # said before any node is reached
