"""What the quick commands load: `bacq version`, `bacq --help` and `bacq run --no-wait` must not
import the live view, aiohttp, Docker (and version/--help no NATS or pydantic either; run
--no-wait, nor run --output json waiting for the job, neither nats-py nor asyncio: they submit
and follow over bacq.corenats). A check of the module set
each one leaves in ``sys.modules``, not a timing (start-up times are bench rows)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bacq.devstack import Devstack

DEVSTACK = {"workers": 1}

# runs `bacq ARGS` in this interpreter and, at exit, writes the modules really loaded (a
# deferred stand-in that was never used does not count) to the file named by the first argument
PROBE = """
import atexit, json, runpy, sys
out, args = sys.argv[1], sys.argv[2:]
def dump():
    loaded = [n for n, m in sys.modules.items()
              if m is not None and type(m).__name__ != "_Deferred"]
    with open(out, "w") as f:
        json.dump(sorted(loaded), f)
atexit.register(dump)
sys.argv = ["bacq", *args]
runpy.run_module("bacq", run_name="__main__", alter_sys=True)
"""


def loaded_by(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> set[str]:
    dump = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(dump), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(dump.read_text()))


def packages(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


BACQ = [sys.executable, "-m", "bacq"]
BUSYBOX_TRUE = ["bacq-test/busybox", "--", "true"]
NEVER = {"aiohttp", "docker", "aioipfs", "structlog", "shtab"}
NOT_FOR_QUICK_ONES = NEVER | {"nats", "pydantic", "rich", "yaml", "asyncio"}


def test_version_loads_no_nats_pydantic_rich_or_aiohttp(tmp_path: Path) -> None:
    loaded = loaded_by(tmp_path, "version")
    assert not packages(loaded) & NOT_FOR_QUICK_ONES, sorted(packages(loaded) & NOT_FOR_QUICK_ONES)
    assert not {"bacq.client", "bacq.bus", "bacq.models", "bacq.render"} & loaded


def test_help_loads_no_nats_pydantic_rich_or_aiohttp(tmp_path: Path) -> None:
    for args in (("--help",), ("run", "--help"), ("create", "--help")):
        loaded = loaded_by(tmp_path, *args)
        assert not packages(loaded) & NOT_FOR_QUICK_ONES, (args, packages(loaded) & NEVER)
        assert not {"bacq.client", "bacq.bus", "bacq.spec"} & loaded
        # the lab's options are mounted; the chaos run itself (dataclasses, inspect) is not
        assert not {"bacq.lab.chaos", "bacq.lab.core"} & loaded, args


def test_run_no_wait_loads_only_what_submission_needs(stack: Devstack, tmp_path: Path) -> None:
    loaded = loaded_by(
        tmp_path, "run", "--no-wait", "bacq-test/busybox", "--", "true", env=stack.env()
    )
    assert "bacq.corenats" in loaded  # it did submit, over a plain socket
    unwanted = NEVER | {"rich", "yaml", "pydantic", "pydantic_core", "nats", "asyncio", "ssl"}
    assert not packages(loaded) & unwanted, sorted(packages(loaded) & unwanted)
    # no live view, no kubo client, no job records, no spec models (the requester checks the
    # spec), no nats-py (a devstack's user and password need none), the parser of its group
    assert (
        not {
            "bacq.render",
            "bacq.storage",
            "bacq.bus",
            "bacq.client",
            "bacq.models",
            "bacq.spec",
            "nats.js",
            "nats.js.api",
            "bacq.commands.services",
            "bacq.commands.jobs",
        }
        & loaded
    )


def test_run_waiting_for_json_follows_the_record_over_a_plain_connection(
    stack: Devstack, tmp_path: Path
) -> None:
    """`bacq run --output json` (waiting, for a program) submits and follows the job's record
    over bacq.corenats too: no nats-py, no pydantic, no live view."""
    loaded = loaded_by(tmp_path, "run", "--output", "json", *BUSYBOX_TRUE, env=stack.env())
    assert "bacq.corenats" in loaded
    unwanted = NEVER | {"rich", "pydantic", "pydantic_core", "nats", "asyncio", "ssl"}
    assert not packages(loaded) & unwanted, sorted(packages(loaded) & unwanted)
    assert not {"bacq.render", "bacq.client", "bacq.models", "bacq.spec"} & loaded


def test_run_waiting_for_json_prints_the_record_describe_prints_and_its_exit_code(
    stack: Devstack,
) -> None:
    env = {**os.environ, **stack.env()}
    done = subprocess.run(
        [
            *BACQ,
            "run",
            "--output",
            "json",
            "bacq-test/busybox",
            "--",
            "sh",
            "-c",
            "echo hi; exit 3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert done.returncode == 3, done.stderr  # accepted, the command exited non-zero
    record = json.loads(done.stdout)
    assert record["state"] == "accepted"
    assert record["exit_code"] == 3
    described = subprocess.run(
        [*BACQ, "describe", record["id"], "--output", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    )
    assert json.loads(described.stdout) == record


def test_run_no_wait_bad_spec_is_refused_with_each_field(stack: Devstack) -> None:
    """The requester checks what run --no-wait sends: the same problems as a local check."""
    done = subprocess.run(
        [*BACQ, "run", "--no-wait", "--cpu", "-3", "--memory", "lots", *BUSYBOX_TRUE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **stack.env()},
    )
    assert done.returncode == 2, done.stderr
    assert "invalid job spec" in done.stderr
    assert "resources.cpu" in done.stderr
    assert "resources.memory" in done.stderr
    assert not done.stdout.strip()


def test_run_no_wait_bad_spec_without_nats_names_the_spec_not_the_connection() -> None:
    done = subprocess.run(
        [*BACQ, "run", "--no-wait", "--cpu", "-3", "--nats", "nats://127.0.0.1:1", *BUSYBOX_TRUE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "resources.cpu" in done.stderr
    assert "cannot reach NATS" not in done.stderr


def test_each_command_builds_the_parser_of_its_group_alone() -> None:
    """bacq.cli.COMMANDS names the commands each group registers, all of them."""
    from bacq.cli import COMMANDS, GROUPS, build_parser, command_of

    assert tuple(COMMANDS) == GROUPS
    full = build_parser()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {c for commands in COMMANDS.values() for c in commands}
    for group, commands in COMMANDS.items():
        for command in commands:
            assert command_of(["--debug", command, "x"]) == command
            alone = build_parser(command)
            alone_sub = next(a for a in alone._actions if isinstance(a, argparse._SubParsersAction))
            assert set(alone_sub.choices) == set(commands), group
            assert alone_sub.choices[command].format_help() == sub.choices[command].format_help()
    assert command_of(["--help"]) is None
    assert command_of(["nope"]) is None


@pytest.mark.parametrize("argv", [["--help"], ["-h", "run"], [], ["--debug"], ["rnu", "x"]])
def test_a_command_line_naming_no_command_is_answered_from_the_outline_as_from_the_parser(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``bacq --help`` (and an error naming no command) is built from bacq.commands.common's
    COMMAND_HELP without the groups' arguments: the same text and exit code as the whole parser."""
    from bacq.cli import build_parser

    answers = []
    for parser in (build_parser(), build_parser(outline=True)):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        answers.append((exit_.value.code, capsys.readouterr()))
    assert answers[0] == answers[1]


def test_bacq_help_alone_loads_no_command_group(tmp_path: Path) -> None:
    loaded = loaded_by(tmp_path, "--help")
    assert not {m for m in loaded if m.startswith("bacq.commands.")} - {"bacq.commands.common"}
    assert "bacq.lab.cli" not in loaded


def test_run_no_wait_through_nats_py_when_corenats_cannot(stack: Devstack, tmp_path: Path) -> None:
    """A server URL bacq.corenats leaves to nats-py (here: credentials in the URL) still
    submits, through nats-py without its JetStream modules."""
    env = stack.env()
    url = env["BACQ_NATS_URL"].replace("nats://", "nats://nobody:nothing@")
    env = {**env, "BACQ_NATS_URL": url}
    loaded = loaded_by(tmp_path, "run", "--no-wait", *BUSYBOX_TRUE, env=env)
    assert "nats" in packages(loaded)
    assert "bacq.corenats" in loaded
    assert not {"nats.js", "nats.js.api", "bacq.spec", "bacq.client"} & loaded
