"""The generated pages of the docs site (bacq.docgen) match the code they are read from."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bacq import docgen
from bacq.cli import build_parser
from bacq.states import EXEC_TRANSITIONS, JOB_TRANSITIONS

ROOT = Path(__file__).resolve().parent.parent


def test_generated_pages_are_fresh() -> None:
    stale = docgen.stale(ROOT)
    assert not stale, f"stale generated pages {stale}: run `python -m bacq.docgen` and commit them"


def test_check_mode_names_a_stale_page_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert docgen.main(["--root", str(tmp_path)]) == 0
    page = tmp_path / "docs/reference/cli.md"
    page.write_text(page.read_text() + "hand-edited\n")
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert "stale: docs/reference/cli.md" in capsys.readouterr().err
    assert page.read_text().endswith("hand-edited\n")
    assert docgen.main(["--check", "--root", str(tmp_path / "empty")]) == 1


def _commands(
    parser: argparse.ArgumentParser, prefix: str
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                sub = action.choices[choice.dest]
                found.append((f"{prefix} {choice.dest}", sub))
                found += _commands(sub, f"{prefix} {choice.dest}")
    return found


def test_cli_reference_has_every_command_and_option() -> None:
    page = docgen.cli_reference()
    for name, parser in _commands(build_parser(), "bacq"):
        assert f"`{name}`" in page, name
        for action in parser._actions:
            if action.help is argparse.SUPPRESS:
                continue  # hidden on purpose (e.g. a worker's --tamper, for tests)
            for option in action.option_strings:
                if option not in ("-h", "--help", "--debug"):
                    assert f"`{option}" in page, (name, option)
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 130 |"):
        assert code in page


def test_state_pages_list_every_transition() -> None:
    job_part, exec_part = docgen.states_reference().split("## Execution")
    for page, table in ((job_part, JOB_TRANSITIONS), (exec_part, EXEC_TRANSITIONS)):
        for state, targets in table.items():
            row = next(line for line in page.splitlines() if line.startswith(f"| `{state}` |"))
            for target in targets:
                assert f"`{target}`" in row.split("|")[4], (state, target)


def test_state_diagram_draws_states_and_reduces_implied_moves() -> None:
    svg = docgen.state_diagram_svg(
        {"a": ["b", "c"], "b": ["c", "a"], "c": []}, "a", ["c"], "three states"
    )
    for state in ("a", "b", "c"):
        assert f">{state}</text>" in svg
    # a→c is implied by a→b→c: two solid moves and one dashed move back (b→a)
    assert svg.count('marker-end="url(#arrow)"') == 3
    assert svg.count("stroke-dasharray") == 1


def test_runnable_blocks_are_found_in_page_order() -> None:
    text = "\n".join(
        [
            "# page",
            "```sh",
            "not runnable",
            "```",
            docgen.RUNNABLE_MARKER,
            "```sh",
            "echo one",
            "```",
            docgen.RUNNABLE_MARKER,
            "",
            "````sh",
            "echo two",
            "```",
            "````",
        ]
    )
    assert docgen.runnable_blocks(text) == ["echo one", "echo two\n```"]
    with pytest.raises(ValueError, match="line 2"):
        docgen.runnable_blocks("x\n" + docgen.RUNNABLE_MARKER + "\ntext")


def test_a_not_runnable_mark_needs_a_reason_and_a_block() -> None:
    text = "x\n<!-- not-runnable: needs a lab -->\n\n```sh\nbacq lab up\n```\n"
    (block,) = docgen.fenced_blocks(text)
    assert (block.line, block.language, block.mark) == (4, "sh", "not-runnable: needs a lab")
    with pytest.raises(ValueError, match="line 1: write the reason"):
        docgen.fenced_blocks("<!-- not-runnable -->\n```sh\nbacq lab up\n```\n")
    with pytest.raises(ValueError, match="line 1"):
        docgen.fenced_blocks("<!-- not-runnable: why -->\nsome text\n```sh\ntrue\n```\n")


def test_shell_blocks_that_run_bacq_without_a_mark_are_named() -> None:
    text = "\n".join(
        [
            "```sh",
            "cid=$(bacq ipfs add words.txt)",
            "```",
            "```",
            "echo hi | bacq create -f -",
            "```",
            "```text",
            "error: start one with `bacq devstack`",  # output, not a command
            "```",
            "```sh",
            "systemctl status bacq-worker@w1; ls /etc/bacq",  # no bacq command
            "```",
            docgen.RUNNABLE_MARKER,
            "```bash",
            "bacq list",
            "```",
        ]
    )
    assert docgen.unmarked_commands(text) == [
        "line 1: cid=$(bacq ipfs add words.txt)",
        "line 4: echo hi | bacq create -f -",
    ]


def test_a_page_script_runs_shell_and_python_blocks_in_page_order() -> None:
    text = "\n".join(
        [
            docgen.RUNNABLE_MARKER,
            "```sh",
            "export GREETING=hi",
            "```",
            docgen.RUNNABLE_MARKER,
            "```python",
            "import os",
            "print(os.environ['GREETING'])",
            "```",
        ]
    )
    script = docgen.page_script(text)
    assert script.startswith("set -euo pipefail\nexport GREETING=hi\npython - <<'")
    assert "print(os.environ['GREETING'])" in script
    with pytest.raises(ValueError, match="shell or python, not 'yaml'"):
        docgen.page_script(docgen.RUNNABLE_MARKER + "\n```yaml\na: 1\n```\n")


def test_the_fleet_pages_shell_blocks_say_they_need_a_fleet() -> None:
    blocks = docgen.fenced_blocks(docgen.fleet_page())
    shell = [b for b in blocks if b.language in docgen.SHELL_LANGUAGES]
    assert shell
    reason = docgen.NOT_RUNNABLE.fullmatch(docgen.FLEET_MARK)
    assert reason
    assert all(b.mark == f"not-runnable: {reason[1]}" for b in shell)
    assert not docgen.unmarked_commands(docgen.fleet_page())


def test_an_output_block_is_a_pattern_per_line_with_dots_for_any_text() -> None:
    text = "\n".join(
        [
            docgen.RUNNABLE_MARKER,
            "```sh",
            "bacq run bacq-test/busybox -- true",
            "```",
            docgen.OUTPUT_MARKER,
            "```text",
            "accepted: 1 of 1 results agree ...",
            "",
            "  fetch it: bacq get j-... (1+1)",
            "```",
        ]
    )
    first, second = docgen.expected_output(text)
    assert first.search("accepted: 1 of 1 results agree  (after 0:01)")
    assert not first.search("accepted: 2 of 3 results agree")
    assert second.search("fetch it: bacq get j-1234 (1+1)")
    assert not second.search("fetch it: bacq get j-1234 (11)")
