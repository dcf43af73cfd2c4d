"""A small scenario framework, after the reference report's executor scenarios.

A scenario says what to put in IPFS (``inputs``: container path → a file's bytes, or a folder as a
mapping of relative names to bytes), how to build the job spec from the CIDs it got, and how to
check the results folder the job produced. ``run_scenario`` drives one through a real devstack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bacq.client import Client
from bacq.states import JobState
from bacq.storage import Storage

Content = bytes | dict[str, bytes]

HELLO_WORLD = b"hello world\n"
FRUITS = b"apple\nbanana\nkiwi\ncherry\nkiwi split\ndate\n"
CSV = b"name,colour,count\napple,red,3\nbanana,yellow,5\nkiwi,green,7\n"
BUSYBOX = "bacq-test/busybox"
DEBIAN = "bacq-test/debian:bookworm"


@dataclass
class Scenario:
    name: str
    inputs: dict[str, Content]
    spec: Callable[[dict[str, str]], dict[str, Any]]  # container path → CID, to a spec
    check: Callable[[Path], None]  # the downloaded results folder
    outputs: list[dict[str, str]] = field(default_factory=list)


def write_content(base: Path, content: Content) -> Path:
    if isinstance(content, bytes):
        base.write_bytes(content)
        return base
    base.mkdir(parents=True)
    for name, data in content.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return base


async def setup_storage(storage: Storage, tmp: Path, inputs: dict[str, Content]) -> dict[str, str]:
    cids = {}
    for index, (mount, content) in enumerate(inputs.items()):
        cids[mount] = await storage.add(write_content(tmp / f"input{index}", content))
    return cids


async def run_scenario(
    scenario: Scenario, client: Client, storage: Storage, tmp: Path, **overrides: Any
) -> Path:
    """Run the scenario's job to its verdict, download and check the results; return them."""
    cids = await setup_storage(storage, tmp, scenario.inputs)
    spec = scenario.spec(cids)
    spec.setdefault("inputs", [{"cid": cid, "path": path} for path, cid in cids.items()])
    spec.setdefault("outputs", scenario.outputs)
    spec.update(overrides)
    job_id = await client.submit(spec)
    job = await client.wait(job_id, timeout=120)
    assert job.state == JobState.ACCEPTED, f"{scenario.name}: {job.state}: {job.reason}"
    results = tmp / "results"
    await client.fetch_results(storage, job, results)
    scenario.check(results)
    return results


# -- checkers ------------------------------------------------------------------------------------
def file_equals(relative: str, expected: bytes) -> Callable[[Path], None]:
    def check(results: Path) -> None:
        assert (results / relative).read_bytes() == expected
        assert (results / "exitCode").read_text() == "0"

    return check


def stdout_equals(expected: bytes) -> Callable[[Path], None]:
    return file_equals("stdout", expected)


# -- the report's scenarios ----------------------------------------------------------------------
SCENARIOS = [
    Scenario(
        name="cat_file_to_stdout",
        inputs={"/data/file.txt": HELLO_WORLD},
        spec=lambda cids: {"image": BUSYBOX, "entrypoint": ["cat", "/data/file.txt"]},
        check=stdout_equals(HELLO_WORLD),
    ),
    Scenario(
        name="cat_file_to_volume",
        inputs={"/data/file.txt": HELLO_WORLD},
        spec=lambda cids: {
            "image": DEBIAN,
            "command": ["bash", "-c", "cat /data/file.txt > /output_folder/file.txt"],
        },
        outputs=[{"name": "apples", "path": "/output_folder"}],
        check=file_equals("apples/file.txt", HELLO_WORLD),
    ),
    Scenario(
        name="grep_file",
        inputs={"/data/fruits.txt": FRUITS},
        spec=lambda cids: {"image": BUSYBOX, "command": ["grep", "kiwi", "/data/fruits.txt"]},
        check=stdout_equals(b"kiwi\nkiwi split\n"),
    ),
    Scenario(
        name="sed_file",
        inputs={"/data/fruits.txt": FRUITS},
        spec=lambda cids: {
            "image": BUSYBOX,
            "command": ["sed", "-n", "/banana/,/cherry/p", "/data/fruits.txt"],
        },
        check=stdout_equals(b"banana\nkiwi\ncherry\n"),
    ),
    Scenario(
        name="awk_file",
        inputs={"/data/fruits.csv": CSV},
        spec=lambda cids: {
            "image": BUSYBOX,
            "command": [
                "awk",
                "-F,",
                "NR > 1 { total += $3 } END { print total }",
                "/data/fruits.csv",
            ],
        },
        check=stdout_equals(b"15\n"),
    ),
    Scenario(
        name="folder_input",
        inputs={"/input": {"a.txt": b"alpha\n", "nested/b.txt": b"beta\n", ".hidden": b"h\n"}},
        spec=lambda cids: {
            "image": BUSYBOX,
            "command": ["sh", "-c", "cd /input && find . -type f | sort && cat a.txt nested/b.txt"],
        },
        check=stdout_equals(b"./.hidden\n./a.txt\n./nested/b.txt\nalpha\nbeta\n"),
    ),
    Scenario(
        name="two_inputs",
        inputs={"/first.txt": b"one\n", "/second.txt": b"two\n"},
        spec=lambda cids: {
            "image": BUSYBOX,
            "command": ["sh", "-c", "cat /first.txt /second.txt > /out/both.txt"],
        },
        outputs=[{"name": "joined", "path": "/out"}],
        check=file_equals("joined/both.txt", b"one\ntwo\n"),
    ),
]
