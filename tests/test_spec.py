"""Job spec validation: good specs pass, and every bad field is named with a way to fix it."""

from __future__ import annotations

import json

import pytest

from bacq.errors import SpecError
from bacq.spec import JobSpec, json_schema, parse_memory, parse_spec

CID = "bafkreihwsgzybywl3dycrr4cp67z3wgjv62ie3gwrmj6c2ygxvrnlpjqha"


def test_minimal_spec_gets_sane_defaults() -> None:
    spec = parse_spec({"image": "bacq-test/busybox"})
    assert spec.engine == "docker"
    assert spec.concurrency == 1
    assert spec.verifier == "deterministic"
    assert spec.resources.memory == 512 * 1024 * 1024
    assert spec.timeout == 600


def test_full_spec_round_trips_through_json() -> None:
    spec = parse_spec(
        {
            "image": "bacq-test/debian:bookworm",
            "entrypoint": ["bash"],
            "command": ["-c", "true"],
            "env": {"A": "1"},
            "working_dir": "/work",
            "inputs": [{"cid": CID, "path": "/file.txt"}],
            "outputs": [{"name": "apples", "path": "/output_folder"}],
            "resources": {"cpu": 0.5, "memory": "256Mi", "pids": 64},
            "timeout": 30,
            "concurrency": 3,
            "confidence": 2,
            "min_bids": 3,
            "verifier": "noop",
            "labels": {"team": "data"},
            "node_selector": {"gpu": "false"},
        }
    )
    assert parse_spec(json.loads(spec.model_dump_json())) == spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512m", 512 * 2**20),
        ("1g", 2**30),
        ("256Mi", 256 * 2**20),
        ("1GB", 2**30),
        ("1048576", 2**20),
        (4096, 4096),
        ("1.5g", int(1.5 * 2**30)),
    ],
)
def test_memory_sizes_parse(text: str | int, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"engine": "gpu"}, "engine"),
        ({"engine": "wasm"}, "image"),  # bacq-test/busybox is not a module
        ({"engine": "wasm", "image": CID, "network": True}, "network"),
        ({"fuel": 1000}, "fuel"),  # fuel is for wasm jobs
        ({"image": ""}, "image"),
        ({"entrypoint": []}, "entrypoint"),
        ({"inputs": [{"cid": "Qm123", "path": "/x"}]}, "inputs.0.cid"),
        ({"inputs": [{"cid": CID, "path": "/x:ro"}]}, "inputs.0.path"),
        ({"inputs": [{"cid": CID}]}, "inputs.0.path"),
        ({"outputs": [{"name": "exitCode", "path": "/o"}]}, "outputs.0.name"),
        ({"outputs": [{"name": "a", "path": "/o"}, {"name": "a", "path": "/p"}]}, "spec"),
        ({"resources": {"memory": "a lot"}}, "resources.memory"),
        ({"resources": {"pids": 1}}, "resources.pids"),
        ({"timeout": 0}, "timeout"),
        ({"concurrency": 0}, "concurrency"),
        ({"confidence": -1}, "confidence"),
        ({"concurrency": 1, "confidence": 2}, "spec"),
        ({"verifier": "majority"}, "verifier"),
        ({"env": {"BAD-KEY": "x"}}, "env"),
        ({"labels": {"": "x"}}, "labels"),
        ({"bid_timeout": 0}, "bid_timeout"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_each_bad_field_is_named(patch: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"image": "bacq-test/busybox", **patch})
    assert field in [f for f, _ in info.value.problems]
    assert field in str(info.value)


def test_json_schema_exports_every_field() -> None:
    schema = json_schema()
    assert set(JobSpec.model_fields) <= set(schema["properties"])
    assert schema["required"] == ["image"]
