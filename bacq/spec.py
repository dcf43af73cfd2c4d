"""The job spec: what a client asks for, validated once, the same way everywhere. Touches nothing.

A spec is plain data (pydantic v2). ``parse_spec`` turns any mapping into a ``JobSpec`` or raises
``SpecError`` whose problems name each bad field (``inputs.0.cid``) and how to fix it.
``json_schema()`` exports the schema for editors and other clients.

``engine`` picks how a worker runs the job: ``docker`` (``image`` is a Docker image) or ``wasm``
(``image`` is the WebAssembly module: the CID of a ``.wasm`` file, or a runtime the workers ship,
see ``WASM_RUNTIMES``); a wasm job is deterministic unless ``deterministic: false``.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bacq.errors import SpecError

__all__ = [
    "RESERVED_OUTPUT_NAMES",
    "WASM_RUNTIMES",
    "InputVolume",
    "JobSpec",
    "OutputVolume",
    "Resources",
    "json_schema",
    "parse_memory",
    "parse_spec",
]

# Files every results folder holds beside the named outputs; no output volume may take these names.
RESERVED_OUTPUT_NAMES = frozenset({"stdout", "stderr", "exitCode"})

_CID_V0 = re.compile(r"^Qm[1-9A-HJ-NP-Za-km-z]{44}$")
_CID_V1_BASE32 = re.compile(r"^b[a-z2-7]{50,}$")
_CID_V1_BASE36 = re.compile(r"^k[0-9a-z]{45,}$")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.\-/]{0,61}[A-Za-z0-9])?$")
_MIN_MEMORY = 6 * 1024 * 1024  # Docker refuses less than 6 MiB
# WebAssembly runtimes that workers ship (bacq.worker.wasm), usable as a wasm job's ``image``.
WASM_RUNTIMES = frozenset({"python-3.12"})
MAX_FUEL = 10**15


def parse_memory(value: int | str) -> int:
    """``512m``, ``1g``, ``256Mi``, ``1GB`` or a plain number of bytes → bytes (powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError("memory must be a size such as 512m or 1g")
    if isinstance(value, int):
        return value
    match = _MEMORY.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size; write it like 512m, 1g or 268435456")
    number, unit, _ = match.groups()
    power = "bkmgt".index(unit.lower() or "b")
    return int(float(number) * (1024**power))


def _check_container_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} must be an absolute path inside the container, like /data")
    parts = path.split("/")
    if ".." in parts or "." in parts:
        raise ValueError(f"{path!r} may not contain '.' or '..' segments")
    if path.rstrip("/") == "":
        raise ValueError("'/' cannot be a volume path; name a directory or file below it")
    if ":" in path or "\x00" in path:
        raise ValueError(f"{path!r} may not contain ':' or NUL")
    return path.rstrip("/")


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 63:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def _cid_bytes(cid: str) -> bytes:
    if _CID_V0.match(cid):
        number = 0
        for char in cid:
            number = number * 58 + _B58.index(char)
        return number.to_bytes(34, "big")
    if _CID_V1_BASE32.match(cid):
        body = cid[1:].upper()
        return base64.b32decode(body + "=" * (-len(body) % 8))
    if _CID_V1_BASE36.match(cid):
        number = int(cid[1:], 36)
        return number.to_bytes((number.bit_length() + 7) // 8, "big")
    raise ValueError("unknown CID encoding")


def _check_cid(cid: str) -> str:
    """A CIDv0 (Qm…) or CIDv1 (base32 b…, base36 k…) whose multihash length adds up."""
    cid = cid.strip().removeprefix("/ipfs/")
    try:
        data = _cid_bytes(cid)
        if data[:2] == b"\x12\x20":  # v0: a bare sha2-256 multihash
            ok = len(data) == 34
        else:
            version, pos = _varint(data, 0)
            _codec, pos = _varint(data, pos)
            _hash, pos = _varint(data, pos)
            length, pos = _varint(data, pos)
            ok = version == 1 and len(data) - pos == length
    except (ValueError, OverflowError, binascii.Error):
        ok = False
    if not ok:
        raise ValueError(
            f"{cid!r} is not a valid CID; use the value printed by `bacq ipfs add` (bafy… or Qm…)"
        )
    return cid


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputVolume(_Model):
    """An IPFS CID mounted read-only at ``path`` in the container (a file or a directory)."""

    cid: str = Field(description="CID of the file or folder to mount")
    path: str = Field(description="absolute path in the container")

    @field_validator("cid")
    @classmethod
    def _cid(cls, value: str) -> str:
        return _check_cid(value)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _check_container_path(value)


class OutputVolume(_Model):
    """A writable directory at ``path`` whose content lands in the results under ``name``."""

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,62}$")] = Field(
        description="folder name in the results (letters, digits, _ . -)"
    )
    path: str = Field(description="absolute directory path in the container")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _check_container_path(value)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_OUTPUT_NAMES:
            raise ValueError(f"{name!r} is reserved for the job's own results; choose another name")
        return name


class Resources(_Model):
    """What one execution may use. The worker enforces these as container limits."""

    cpu: float = Field(default=1.0, gt=0, le=256, description="CPU cores (fractions allowed)")
    memory: int = Field(default=512 * 1024 * 1024, description="bytes; accepts 512m, 1g, 256Mi")
    pids: int = Field(default=256, ge=16, le=65536, description="max processes in the container")

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int:
        if not isinstance(value, int | str):
            raise ValueError("memory must be a size such as 512m or 1g")
        memory = parse_memory(value)
        if memory < _MIN_MEMORY:
            raise ValueError("memory must be at least 6m (Docker's minimum)")
        return memory


class JobSpec(_Model):
    """A job: run ``image`` with inputs from IPFS, on ``concurrency`` workers, verified."""

    engine: Literal["docker", "wasm"] = Field(
        default="docker",
        description="docker: run image in a container; wasm: run image as a WebAssembly (WASI) "
        "module",
    )
    image: Annotated[
        str, StringConstraints(min_length=1, max_length=255, strip_whitespace=True)
    ] = Field(
        description="Docker image, e.g. bacq-test/debian:bookworm; for engine wasm the module: "
        "the CID of a .wasm file, or a runtime the workers ship (python-3.12)"
    )
    entrypoint: list[str] | None = Field(
        default=None, description="overrides the image's entrypoint, like docker run --entrypoint"
    )
    command: list[str] = Field(
        default_factory=list, description="arguments, like docker run IMAGE CMD"
    )
    env: dict[str, str] = Field(default_factory=dict, description="environment variables")
    working_dir: str | None = Field(default=None, description="working directory in the container")
    inputs: list[InputVolume] = Field(default_factory=list, description="IPFS inputs, read-only")
    outputs: list[OutputVolume] = Field(default_factory=list, description="named output folders")
    resources: Resources = Field(default_factory=Resources)
    network: bool = Field(
        default=False,
        description="the job needs network access; only workers started with --allow-network bid",
    )
    timeout: float = Field(
        default=600.0, gt=0, le=86400, description="seconds the container may run"
    )
    concurrency: int = Field(default=1, ge=1, le=64, description="how many workers run the job")
    confidence: int = Field(
        default=0, ge=0, description="matching results needed to accept (0..concurrency)"
    )
    min_bids: int = Field(
        default=0, ge=0, le=1024, description="bids to wait for before choosing workers"
    )
    retries: int = Field(
        default=2, ge=0, le=10, description="times a lost execution is moved to another worker"
    )
    bid_timeout: float = Field(
        default=10.0, gt=0, le=3600, description="seconds to wait for enough bids"
    )
    queue_timeout: float = Field(
        default=3600.0,
        gt=0,
        le=7 * 86400,
        description="seconds the job may wait in the queue while every worker that could run "
        "it is busy",
    )
    verifier: Literal["noop", "deterministic"] = Field(
        default="deterministic", description="noop: accept the first result; deterministic: quorum"
    )
    labels: dict[str, str] = Field(default_factory=dict, description="the job's own labels")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="labels a worker must have to bid"
    )
    deterministic: bool | None = Field(
        default=None,
        description="the output depends on the spec and inputs alone (wasm jobs are, by "
        "default): a job that equals an accepted one is answered with its result at once; for "
        "engine wasm, false gives the module real time and randomness instead of a fixed "
        "virtual clock and a seeded random",
    )
    no_cache: bool = Field(
        default=False, description="run it even when an equal deterministic job was accepted"
    )
    live_logs: bool = Field(
        default=False,
        description="stream the output live even with several workers verifying it (weakens "
        "the check: another worker's operator could copy it instead of computing)",
    )
    fuel: int | None = Field(
        default=None,
        ge=1,
        le=MAX_FUEL,
        description="engine wasm: the job's fuel budget (about one unit per instruction); "
        "unset: the worker's default",
    )

    @field_validator("image")
    @classmethod
    def _image(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("engine") != "wasm" or value in WASM_RUNTIMES:
            return value
        try:
            return _check_cid(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a module: for engine wasm, give the CID of a .wasm file "
                f"(`bacq ipfs add module.wasm`) or one of {', '.join(sorted(WASM_RUNTIMES))}"
            ) from None

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("an entrypoint, when given, needs at least the program to run")
        if value is not None and info.data.get("engine") == "wasm":
            raise ValueError("entrypoint is for engine docker; a wasm job's arguments are command")
        return value

    @field_validator("working_dir")
    @classmethod
    def _working_dir(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("engine") == "wasm":
            raise ValueError("working_dir is for engine docker; WASI has no working directory")
        return None if value is None else _check_container_path(value)

    @field_validator("network")
    @classmethod
    def _network(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("engine") == "wasm":
            raise ValueError("a wasm job has no network; use engine docker with network: true")
        return value

    @field_validator("fuel")
    @classmethod
    def _fuel(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("engine") != "wasm":
            raise ValueError("fuel is for engine wasm; a Docker job is bounded by its timeout")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _ENV_KEY.match(key):
                raise ValueError(f"{key!r} is not a valid variable name (letters, digits, _)")
        return value

    @field_validator("labels", "node_selector")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _LABEL_KEY.match(key):
                raise ValueError(f"{key!r} is not a valid label key (letters, digits, _ . - /)")
        return value

    @model_validator(mode="after")
    def _cross_fields(self) -> JobSpec:
        if self.confidence > self.concurrency:
            raise ValueError(
                f"confidence ({self.confidence}) cannot exceed concurrency ({self.concurrency})"
            )
        paths = [v.path for v in self.inputs] + [v.path for v in self.outputs]
        for i, path in enumerate(paths):
            for other in paths[i + 1 :]:
                if path == other or path.startswith(other + "/") or other.startswith(path + "/"):
                    raise ValueError(
                        f"volume paths {path!r} and {other!r} overlap; use separate paths"
                    )
        names = [v.name for v in self.outputs]
        if len(names) != len(set(names)):
            raise ValueError("output volume names must be unique")
        return self


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "spec"


def parse_spec(data: Any) -> JobSpec:
    """Validate ``data`` (a mapping, or a JobSpec) into a JobSpec, or raise SpecError."""
    if isinstance(data, JobSpec):
        return data
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            message = str(err["msg"]).removeprefix("Value error, ")
            problems.append((_field_path(tuple(err["loc"])), message))
        raise SpecError(problems) from None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a job spec."""
    return JobSpec.model_json_schema()
