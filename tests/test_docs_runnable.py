"""Every shell block the docs mark runnable (``<!-- runnable -->`` before the fence) runs, in page
order in one shell per page, against a real devstack, and succeeds: the docs cannot show a command
that does not work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bacq.devstack import Devstack
from bacq.docgen import runnable_blocks

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parent.parent / "docs"
DEVSTACK = {"workers": 3}
PAGES = {
    str(path.relative_to(DOCS)): blocks
    for path in sorted(DOCS.rglob("*.md"))
    if (blocks := runnable_blocks(path.read_text(encoding="utf-8")))
}


def test_the_runnable_set_covers_a_first_job_end_to_end() -> None:
    script = "\n".join(block for blocks in PAGES.values() for block in blocks)
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
    ):
        assert command in script, f"no runnable block shows `{command}`"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_runnable_blocks_of_page_succeed(page: str, stack: Devstack, tmp_path: Path) -> None:
    script = "\n".join(["set -euo pipefail", *PAGES[page]])
    env = {
        **os.environ,
        **stack.env(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "COLUMNS": "120",
    }
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, (
        f"{page}: a runnable block failed (exit {done.returncode})\n"
        f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
