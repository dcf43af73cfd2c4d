"""The event-built YAML reader of files of many jobs equals PyYAML's safe loader, or gives up."""

from __future__ import annotations

import math
from typing import Any

import pytest
import yaml

from bacq import _fastyaml
from bacq.jobfile import JobFileError, parse_jobs_text

SAME = [
    "",
    "---\n---\n",
    "a: 1\nb: 0x1F\nc: 1_000\nd: 1.5e3\ne: .inf\ni: ~\nj: null\nk:\nl: '1'\nm: \"x\"\n",
    "n: |\n  block\no: >\n  folded\n  text\n",
    "- 1\n- [a, b, {c: d}]\n- {}\n- []\n",
    "a: 190:20:30\nb: 0o17\nc: 017\nd: +12\ne: -0.5\nf: 1e3\n",
    "--- 1\n--- 2\n...\n--- [3]\n",
    "{a: 1, a: 2}\n",
    "- on\n- off\n- Off\n- TRUE\n- y\n- n\n- yes\n- No\n",
    "-1\n",
    "'': 1\n",
    "a: 1\n---\n- x\n",
    "? a\n",
    "- image: busybox\n  command: [echo, hi]\n  env: {A: '1'}\n  timeout: 30\n",
    "a: &x 1\nb: *x\n",
    "- &job\n  image: busybox\n  command: &c [echo, hi]\n- *job\n- {image: b, command: *c}\n",
    "&k a: 1\n*k : 2\n",
    "a: &x [1]\n---\na: &x [2]\nb: *x\n",
]
UNUSUAL = [
    "a: *nowhere\n",
    "a: &x 1\nb: &x 2\n",
    "<<: {a: 1}\n",
    "a: 2001-12-14\n",
    "? [a]\n: 1\n",
    "!!str 1\n",
    "x: =\n",
    "a: !!binary aGk=\n",
]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("text", SAME)
def test_plain_yaml_reads_as_pyyaml_reads_it(text: str) -> None:
    got = _fastyaml.load_all(text)
    want = list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    assert got == want
    assert [type(d) for d in got] == [type(d) for d in want]


def test_nan_and_every_scalar_type_match() -> None:
    text = "a: .nan\nb: 1\nc: 1.0\nd: true\ne: null\nf: x\n"
    got, want = _fastyaml.load_all(text)[0], yaml.safe_load(text)
    assert all(_same(got[k], want[k]) for k in want)


@pytest.mark.parametrize("text", UNUSUAL)
def test_anchors_tags_merges_timestamps_and_complex_keys_are_left_to_pyyaml(text: str) -> None:
    with pytest.raises(_fastyaml.Unusual):
        _fastyaml.load_all(text)


@pytest.mark.parametrize("text", ["a: b: c\n", "a: [1, 2\n", "- a\n b: c\n"])
def test_a_syntax_error_is_libyamls(text: str) -> None:
    with pytest.raises(yaml.YAMLError):
        _fastyaml.load_all(text)


def test_an_alias_is_the_anchored_object_itself_as_pyyaml_makes_it() -> None:
    # yaml.safe_dump writes a list shared by every job once, with an anchor, then aliases
    text = yaml.safe_dump([{"command": c, "i": i} for i, c in enumerate([["true"]] * 3)])
    assert "&id001" in text
    got = _fastyaml.load_all(text)[0]
    assert got == yaml.safe_load(text)
    assert got[0]["command"] is got[2]["command"]


@pytest.mark.parametrize("text", ["a: 1\nb: *nowhere\n", "a: &x 1\nb: &x 2\n"])
def test_an_alias_to_no_anchor_or_an_anchor_defined_twice_is_pyyamls_error(text: str) -> None:
    with pytest.raises(yaml.YAMLError):
        list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    with pytest.raises(JobFileError, match="line 2: file: is not valid YAML"):
        parse_jobs_text(text, "jobs.yaml")


def test_a_jobs_file_with_anchors_reads_as_one_without() -> None:
    text = "- &job\n  image: busybox\n  command: [echo, hi]\n- *job\n"
    jobs = parse_jobs_text(text, "jobs.yaml")
    assert jobs.problems == []
    assert [s.command for s in jobs.specs if s is not None] == [["echo", "hi"]] * 2
