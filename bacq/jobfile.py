"""Job files (YAML or JSON) for ``bacq create -f`` and ``bacq validate -f``. Touches the file given.

A job file holds a job spec's fields at its top level (``image``, ``command``, ``inputs``…; the
JSON Schema is ``bacq schema``). ``load_job_file`` returns a ``JobSpec`` or raises ``JobFileError``
whose problems each name the field, its line in the file, and what to do. The file is parsed
with PyYAML's node tree (JSON is read by the same parser), so every value keeps its line.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bacq.errors import BacqError, SpecError
from bacq.spec import JobSpec, parse_spec

__all__ = ["FileProblem", "JobFileError", "load_job_file", "parse_job_text", "spec_to_yaml"]


@dataclass(frozen=True)
class FileProblem:
    field: str  # dotted path (inputs.0.cid), or "file" for problems of the file itself
    line: int | None  # 1-based
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.field}: {self.message}"


class JobFileError(BacqError):
    """A job file cannot be read, is not YAML/JSON, or holds an invalid spec."""

    def __init__(self, source: str, problems: list[FileProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(str(p) for p in problems))


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
            problems.append(FileProblem(field, line, message))
        raise JobFileError(source, problems) from None


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


def load_job_file(path: str) -> JobSpec:
    """Read ``path`` (``-`` is stdin) and return its job spec, or raise JobFileError."""
    source, text = _read(path)
    return parse_job_text(text, source)


def spec_to_yaml(spec: JobSpec) -> str:
    """The spec as a job file (``bacq run --dry-run``): ``bacq create -f`` reads it back."""
    data = spec.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
