"""Every command the docs show runs, or the page says why it cannot.

A fenced block right after a ``<!-- runnable -->`` line runs against a real devstack: a page's
runnable blocks run in page order as one bash script (``bacq.docgen.page_script``: shell blocks as
they are, python blocks fed to ``python -``) in a fresh folder, and the script must succeed. A shell
block that runs ``bacq`` but cannot run there (it needs root, a lab, a fleet, or runs until Ctrl-C)
carries ``<!-- not-runnable: REASON -->``; a shell block with neither mark fails the rule test, and
every bacq command the docs show must be run by some runnable block unless it is listed in
``NOT_ON_A_DEVSTACK`` with the reason. A block after ``<!-- output -->`` shows what the page's
runnable blocks print: each of its lines must be printed (``...`` matches anything). The examples
make their own inputs (heredocs), so a reader can paste them as they are.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bacq.cli import build_parser
from bacq.devstack import Devstack
from bacq.docgen import (
    bacq_commands,
    expected_output,
    fenced_blocks,
    page_script,
    unmarked_commands,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
DEVSTACK = {"workers": 3}
TEXTS = {
    str(path.relative_to(DOCS)): path.read_text(encoding="utf-8")
    for path in sorted(DOCS.rglob("*.md"))
}
PAGES = {
    page: page_script(text)
    for page, text in TEXTS.items()
    if any(block.mark == "runnable" for block in fenced_blocks(text))
}
# commands the docs show that a devstack cannot run, and why
NOT_ON_A_DEVSTACK = {
    "bacq devstack": "runs in the foreground until Ctrl-C; the test starts its own",
    "bacq requester": "a service: the devstack runs it",
    "bacq verifier": "a service: the devstack runs it",
    "bacq worker": "a service: the devstack runs it",
    "bacq lab": "needs root and network namespaces (tests/test_lab*.py run it)",
    "bacq nodes release": "needs a quarantined node (tests/test_reputation*.py make one)",
}


@functools.cache
def _command_names() -> dict[str, set[str]]:
    """``bacq CMD`` → its subcommands (``bacq nodes`` → {"release"}), from the parser."""
    import argparse

    names: dict[str, set[str]] = {}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                names[f"bacq {name}"] = {
                    child
                    for inner in sub._actions
                    if isinstance(inner, argparse._SubParsersAction)
                    for child in inner.choices
                }
    return names


def _commands_in(lines: list[str]) -> set[str]:
    """The bacq commands (``bacq run``, ``bacq ipfs add``) that ``lines`` run."""
    names = _command_names()
    found = set()
    for line in lines:
        for first, second in re.findall(r"\bbacq\s+([a-z][\w-]*)(?:\s+([a-z][\w-]*))?", line):
            command = f"bacq {first}"
            if command in names:
                found.add(f"{command} {second}" if second in names[command] else command)
    return found


def test_every_shell_block_that_runs_bacq_is_runnable_or_says_why_not() -> None:
    unmarked = [
        f"docs/{page} {problem}"
        for page, text in TEXTS.items()
        for problem in unmarked_commands(text)
    ]
    assert not unmarked, (
        "shell blocks that run bacq with neither <!-- runnable --> nor "
        "<!-- not-runnable: REASON --> before them:\n" + "\n".join(unmarked)
    )


def test_every_bacq_command_the_docs_show_is_run_by_a_runnable_block() -> None:
    # shown: in a shell block, or in a code span of the prose (`bacq schema`)
    shown: set[str] = set()
    run: set[str] = set()
    for text in TEXTS.values():
        for block in fenced_blocks(text):
            commands = _commands_in(bacq_commands(block))
            shown |= commands
            if block.mark == "runnable":
                run |= commands
        prose = re.sub(r"^(`{3,}|~{3,}).*?^\1\s*$", "", text, flags=re.S | re.M)
        shown |= _commands_in(re.findall(r"`([^`\n]+)`", prose))
    exempt = {
        c for c in shown if c in NOT_ON_A_DEVSTACK or c.rsplit(" ", 1)[0] in NOT_ON_A_DEVSTACK
    }
    assert "bacq run" in shown
    assert "bacq ipfs add" in shown
    missing = sorted(c for c in shown - run - exempt if not any(r.startswith(f"{c} ") for r in run))
    assert not missing, f"the docs show these commands but no runnable block runs them: {missing}"
    ran_anyway = sorted(run & exempt)
    assert not ran_anyway, f"runnable now, drop them from NOT_ON_A_DEVSTACK: {ran_anyway}"


def test_every_output_block_follows_runnable_blocks() -> None:
    for page, text in TEXTS.items():
        if expected_output(text):
            assert page in PAGES, f"docs/{page} shows output but runs nothing that prints it"


def test_the_runnable_set_covers_a_first_job_end_to_end() -> None:
    script = "\n".join(PAGES.values())
    for command in (
        "bacq ipfs add",
        "bacq run",
        "bacq list",
        "bacq describe",
        "bacq nodes",
        "bacq get",
        "bacq logs",
        "bacq history",
        "--verify",
        "--engine wasm",
        "python count.py",
        "bacq create -f -",
        "Client.connect",
    ):
        assert command in script, f"no runnable block shows `{command}`"


def _env(stack: Devstack) -> dict[str, str]:
    # the venv's bacq and python first; Go for the wasm guide (a fresh toolchain: never fetch one)
    paths = [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if Path(go).exists():
        paths.append(str(Path(go).parent))
    return {
        **os.environ,
        **stack.env(),
        "PATH": os.pathsep.join(paths),
        "GOTOOLCHAIN": "local",
        "COLUMNS": "120",
    }


@pytest.mark.integration
@pytest.mark.parametrize("page", sorted(PAGES))
def test_runnable_blocks_of_page_succeed(page: str, stack: Devstack, tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", "-c", PAGES[page]],
        cwd=tmp_path,
        env=_env(stack),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    printed = f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, (
        f"{page}: a runnable block failed (exit {done.returncode})\n{printed}"
    )
    for pattern in expected_output(TEXTS[page]):
        assert pattern.search(done.stdout) or pattern.search(done.stderr), (
            f"{page}: an output block shows a line the commands did not print: "
            f"{pattern.pattern}\n{printed}"
        )
