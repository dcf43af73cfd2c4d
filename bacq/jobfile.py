"""Job files (YAML or JSON) for ``bacq create -f`` and ``bacq validate -f``. Touches the file given.

A job file holds a job spec's fields at its top level (``image``, ``command``, ``inputs``…; the
JSON Schema is ``bacq schema``). ``load_job_file`` returns a ``JobSpec`` or raises ``JobFileError``
whose problems each name the field, its line in the file, and what to do. The file is parsed
with PyYAML's node tree (JSON is read by the same parser), so every value keeps its line.

A file may also hold many jobs (``load_jobs_file``): a YAML list of job mappings, several YAML
documents (``---`` between them), or JSON lines (one job object per line). Each problem then
also names the job (``index``, from 0 in file order). Many jobs are read from libyaml's events
when PyYAML has it (``bacq._fastyaml``), and the node tree (for line numbers) is built only when a
job has a problem.
"""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bacq import _fastyaml
from bacq.errors import BacqError, SpecError
from bacq.spec import JobSpec, parse_spec

__all__ = [
    "FileProblem",
    "JobFileError",
    "load_job_file",
    "load_jobs_file",
    "parse_job_text",
    "parse_jobs_text",
    "spec_to_yaml",
]


@dataclass(frozen=True)
class FileProblem:
    field: str  # dotted path (inputs.0.cid), or "file" for problems of the file itself
    line: int | None  # 1-based
    message: str
    index: int | None = None  # which job of a file of many (from 0), None for a one-job file

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        job = f"job {self.index}: " if self.index is not None else ""
        return f"{where}{job}{self.field}: {self.message}"


class JobFileError(BacqError):
    """A job file cannot be read, is not YAML/JSON, or holds an invalid spec."""

    def __init__(self, source: str, problems: list[FileProblem], *, summary: str = "") -> None:
        self.source = source
        self.problems = problems
        self.summary = summary  # one line about the whole file (a file of many jobs)
        shown = "; ".join(str(p) for p in problems[:20]) + ("; …" if len(problems) > 20 else "")
        super().__init__(f"{source}: " + (f"{summary}: " if summary else "") + shown)


def _read(path: str) -> tuple[str, str]:
    if path == "-":
        return "<stdin>", sys.stdin.read()
    file = Path(path)
    try:
        return path, file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobFileError(
            path, [FileProblem("file", None, "no such file; check the path (or use - for stdin)")]
        ) from None
    except IsADirectoryError:
        raise JobFileError(
            path, [FileProblem("file", None, "is a folder, not a job file")]
        ) from None
    except UnicodeDecodeError:
        raise JobFileError(
            path, [FileProblem("file", None, "is not UTF-8 text; save it as UTF-8 YAML or JSON")]
        ) from None
    except OSError as exc:
        raise JobFileError(path, [FileProblem("file", None, exc.strerror or str(exc))]) from None


def _locate(node: yaml.Node | None, loc: tuple[int | str, ...]) -> tuple[int | None, bool]:
    """The 1-based line of the node at ``loc``, and whether it was found exactly.

    When the path ends early (a missing field), the line of the deepest node found is given.
    """
    if node is None:
        return None, False
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    child = value
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            child = node.value[part]
        if child is None:
            return node.start_mark.line + 1, False
        node = child
    return node.start_mark.line + 1, True


def _key_line(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The line of the key that names ``loc[-1]`` (for unknown fields, the key is what is wrong)."""
    parent_line, found = _locate(node, loc[:-1])
    if not found or node is None:
        return parent_line
    parent = node
    for part in loc[:-1]:
        if isinstance(parent, yaml.MappingNode):
            parent = next(v for k, v in parent.value if k.value == str(part))
        elif isinstance(parent, yaml.SequenceNode) and isinstance(part, int):
            parent = parent.value[part]
    if isinstance(parent, yaml.MappingNode):
        for key, _ in parent.value:
            if key.value == str(loc[-1]):
                return int(key.start_mark.line) + 1
    return parent_line


def parse_job_text(text: str, source: str = "<job file>") -> JobSpec:
    """Parse and validate a job file's text; raise JobFileError naming each field and line."""
    if not text.strip():
        raise JobFileError(
            source,
            [
                FileProblem(
                    "file", None, "is empty; a job needs at least `image:` (see bacq schema)"
                )
            ],
        )
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else mark.line + 1
        what = exc.problem or exc.context or "syntax error"
        raise JobFileError(
            source,
            [FileProblem("file", line, f"is not valid YAML or JSON ({what}); fix the syntax")],
        ) from None
    except yaml.YAMLError as exc:
        raise JobFileError(
            source, [FileProblem("file", None, f"is not valid YAML or JSON ({exc})")]
        ) from None
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise JobFileError(
            source,
            [
                FileProblem(
                    "file",
                    1,
                    f"holds {kind}, not a mapping of job fields; start with `image: ...`",
                )
            ],
        )
    try:
        return parse_spec(data)
    except SpecError as exc:
        raise JobFileError(source, _problems(exc, root)) from None


def _problems(
    exc: SpecError, root: yaml.Node | None, index: int | None = None
) -> list[FileProblem]:
    """The problems of one job's spec, each with the line of its field under ``root``."""
    problems = []
    for field, message in exc.problems:
        loc: tuple[int | str, ...] = tuple(
            int(p) if p.isdigit() else p for p in field.split(".") if field != "spec"
        )
        if message == "Extra inputs are not permitted":
            line = _key_line(root, loc)
            message = _unknown_field_message(loc)
        elif message == "Field required":
            line, _ = _locate(root, loc)
            message = f"required field missing; add `{loc[-1]}:`" if loc else message
        else:
            line, _ = _locate(root, loc)
        problems.append(FileProblem(field, line, message, index))
    return problems


def _unknown_field_message(loc: tuple[int | str, ...]) -> str:
    model: Any = JobSpec
    for part in loc[:-1]:
        annotation = model.model_fields.get(str(part)) if isinstance(part, str) else None
        model = getattr(annotation, "annotation", None) if annotation else None
        if not isinstance(model, type) or not hasattr(model, "model_fields"):
            return "unknown field; remove it or fix its name (`bacq schema` lists the fields)"
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f"did you mean `{close[0]}`?" if close else "known fields: " + ", ".join(known)
    return f"unknown field; remove it or fix its name ({hint})"


@dataclass
class JobsFile:
    """The jobs of a file, in file order: ``specs[i]`` is None where job ``i`` has problems."""

    source: str
    specs: list[JobSpec | None]
    problems: list[FileProblem]
    many: bool  # a list, several documents or JSON lines (not one job mapping)

    @property
    def valid(self) -> list[tuple[int, JobSpec]]:
        return [(i, spec) for i, spec in enumerate(self.specs) if spec is not None]


_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def _json_lines(text: str, source: str) -> tuple[list[Any], list[int]]:
    """One JSON value per non-blank line, and the line of each."""
    items, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise JobFileError(
                source,
                [
                    FileProblem(
                        "file",
                        number,
                        f"is not valid JSON lines ({exc.msg}); each line holds one job object",
                    )
                ],
            ) from None
        lines.append(number)
    return items, lines


def _yaml_documents(text: str, source: str) -> list[Any]:
    try:
        try:
            return _fastyaml.load_all(text)  # plain YAML, read from libyaml's events
        except _fastyaml.Unusual:
            return list(yaml.load_all(text, Loader=_FAST_LOADER))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else mark.line + 1
        what = exc.problem or exc.context or "syntax error"
        raise JobFileError(
            source,
            [FileProblem("file", line, f"is not valid YAML or JSON ({what}); fix the syntax")],
        ) from None
    except yaml.YAMLError as exc:
        raise JobFileError(
            source, [FileProblem("file", None, f"is not valid YAML or JSON ({exc})")]
        ) from None


def parse_jobs_text(text: str, source: str = "<job file>") -> JobsFile:
    """Parse a file of one or many jobs; raise JobFileError for problems of the file itself
    (syntax, empty), report each job's problems (with its index and line) in the result."""
    stripped = text.lstrip()
    items: Any = None
    lines: list[int] | None = None  # JSON lines: the line of each job
    many = True
    if stripped.startswith("{"):
        try:
            single = json.loads(text)
        except json.JSONDecodeError as exc:
            if not exc.msg.startswith("Extra data"):
                single = None  # not JSON: YAML (flow style) may still read it
            else:
                items, lines = _json_lines(text, source)
                many = len(items) > 1
        else:
            if isinstance(single, dict):
                return JobsFile(source, [parse_job_text(text, source)], [], many=False)
    elif stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None
    if items is None:
        documents = _yaml_documents(text, source)
        present = [(i, d) for i, d in enumerate(documents) if d is not None]
        if not present:
            parse_job_text(text, source)  # raises: empty
        if len(present) == 1 and isinstance(present[0][1], dict):
            return JobsFile(source, [parse_job_text(text, source)], [], many=False)
        if len(present) == 1 and isinstance(present[0][1], list):
            items = present[0][1]
        else:
            items = [d for _, d in present]
    if not isinstance(items, list):
        raise JobFileError(
            source,
            [FileProblem("file", 1, f"holds {_kind(items)}, not a job or a list of jobs")],
        )
    if not items:
        raise JobFileError(
            source, [FileProblem("file", None, "holds no jobs; a job needs at least `image:`")]
        )
    specs: list[JobSpec | None] = []
    failed: dict[int, SpecError | None] = {}  # None: the job is not a mapping
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            specs.append(None)
            failed[index] = None
            continue
        try:
            specs.append(parse_spec(item))
        except SpecError as exc:
            specs.append(None)
            failed[index] = exc
    problems: list[FileProblem] = []
    if failed:
        nodes = _job_nodes(text, len(items)) if lines is None else None
        for index, error in failed.items():
            node = nodes[index] if nodes is not None else None
            offset = lines[index] - 1 if lines is not None else 0
            if error is None:
                line = lines[index] if lines is not None else _locate(node, ())[0]
                problems.append(
                    FileProblem(
                        "job",
                        line,
                        f"holds {_kind(items[index])}, not a mapping of job fields",
                        index,
                    )
                )
                continue
            for problem in _problems(error, node, index):
                line = problem.line
                if lines is not None:  # one JSON object per line: the problem is on its line
                    line = offset + 1
                problems.append(FileProblem(problem.field, line, problem.message, index))
    return JobsFile(source, specs, problems, many)


def _job_nodes(text: str, count: int) -> list[yaml.Node | None]:
    """Each job's node (for line numbers): the items of a list, or the documents of a stream."""
    documents = [
        d
        for d in yaml.compose_all(text, Loader=_FAST_LOADER)
        if not (isinstance(d, yaml.ScalarNode) and d.tag.endswith(":null"))
    ]
    if len(documents) == 1 and isinstance(documents[0], yaml.SequenceNode):
        found: list[yaml.Node | None] = list(documents[0].value)
    else:
        found = list(documents)
    return found + [None] * (count - len(found))


def load_jobs_file(path: str) -> JobsFile:
    """Read ``path`` (``-`` is stdin) holding one job or many (see the module's docstring)."""
    source, text = _read(path)
    return parse_jobs_text(text, source)


def load_job_file(path: str) -> JobSpec:
    """Read ``path`` (``-`` is stdin) and return its job spec, or raise JobFileError."""
    source, text = _read(path)
    return parse_job_text(text, source)


def spec_to_yaml(spec: JobSpec) -> str:
    """The spec as a job file (``bacq run --dry-run``): ``bacq create -f`` reads it back."""
    data = spec.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
