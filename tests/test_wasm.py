"""wasm jobs through a real devstack (nats-server, kubo, three workers running wasmtime).

The guests are small WASI programs in Go (tests/wasm/*), built with ``GOOS=wasip1 GOARCH=wasm`` at
test setup and cached outside the repository (``~/.cache/bacq/wasm-tests/<hash>``, like kubo). Go
is required: without it the build fails and so do these tests. Python jobs run on the CPython for
WASI that the workers ship.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bacq.client import Client
from bacq.devstack import Devstack
from bacq.models import JobRecord
from bacq.spec import JobSpec
from bacq.states import JobState
from bacq.storage import Storage
from bacq.wasmjobs import add_module, cli_spec, run_python, wasm_spec
from tests.conftest import run_cli

WASM_SOURCES = Path(__file__).parent / "wasm"
PROGRAMS = ("clock", "spin", "sleep", "alloc", "flood", "writein")
RESULTS_LIMIT = 2 * 1024**2
MODULE_LIMIT = 8 * 1024**2
DEVSTACK = {
    "workers": 3,
    "worker_args": ["--results-limit", "2m", "--wasm-module-limit", "8m"],
}


def _go() -> str:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).exists():
        raise AssertionError("Go is needed to build the test modules: install it (apt or setup)")
    return go


def _build_programs() -> dict[str, Path]:
    go = _go()
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(version.encode())
    for source in sorted(WASM_SOURCES.rglob("*")):
        if source.is_file():
            digest.update(source.relative_to(WASM_SOURCES).as_posix().encode())
            digest.update(source.read_bytes())
    cache = Path.home() / ".cache" / "bacq" / "wasm-tests" / digest.hexdigest()[:16]
    built = {name: cache / f"{name}.wasm" for name in PROGRAMS}
    if all(path.exists() for path in built.values()):
        return built
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOOS": "wasip1", "GOARCH": "wasm", "GOTOOLCHAIN": "local"}
    for name, path in built.items():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(
            [go, "build", "-trimpath", "-o", str(tmp), f"./{name}"],
            cwd=WASM_SOURCES,
            env=env,
            check=True,
            timeout=600,
        )
        tmp.replace(path)
    return built


@pytest.fixture(scope="module")
def programs() -> dict[str, Path]:
    return _build_programs()


@pytest.fixture
async def modules(storage: Storage, programs: dict[str, Path]) -> dict[str, str]:
    return {name: await add_module(storage, path) for name, path in programs.items()}


async def _run(client: Client, spec: JobSpec, timeout: float = 300) -> JobRecord:
    job_id = await client.submit(spec)
    return await client.wait(job_id, timeout=timeout)


def _errors(job: JobRecord) -> str:
    return " | ".join(e.error or "" for e in job.executions.values())


async def test_three_workers_running_a_program_of_time_and_randomness_agree(
    client: Client, storage: Storage, modules: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b", "a", "c"):  # created out of order: the listing comes sorted anyway
        (folder / name).write_text(name)
    inputs = await storage.add(folder)
    spec = wasm_spec(
        modules["clock"],
        ["x", "y"],
        inputs=[(inputs, "/in")],
        outputs=[("out", "/out")],
        env={"GREETING": "hello"},
        concurrency=3,
        confidence=3,
    )
    job = await _run(client, spec)
    assert job.state == JobState.ACCEPTED, (job.reason, _errors(job))
    cids = {e.result_cid for e in job.executions.values()}
    assert len(cids) == 1
    assert None not in cids
    assert job.result_cid is not None
    result = await storage.fetch(job.result_cid, tmp_path / "result")
    text = (result / "out" / "result.txt").read_text()
    assert (result / "stdout").read_text() == text
    lines = text.splitlines()
    assert lines[0].startswith("time 2000-01-01T00:00:00")
    assert lines[2] == "slept 2s"  # 1.5 s of virtual time, rounded; no real waiting
    assert [line.split()[1] for line in lines if line.startswith("entry")] == ["a", "b", "c"]
    assert "entry a 2000-01-01T00:00:00Z" in lines
    assert lines[-1] == "args x,y env hello"


async def test_a_module_past_its_fuel_budget_fails_naming_the_budget(
    client: Client, modules: dict[str, str]
) -> None:
    job = await _run(client, wasm_spec(modules["spin"], fuel=50_000_000))
    assert job.state == JobState.FAILED
    assert "used up its fuel budget of 50000000" in _errors(job)


async def test_a_module_sleeping_past_its_timeout_is_stopped(
    client: Client, modules: dict[str, str]
) -> None:
    # real time: the guest blocks in poll_oneoff, a host call, and its child process is killed
    job = await _run(client, wasm_spec(modules["sleep"], deterministic=False, timeout=3))
    assert job.state == JobState.FAILED
    assert "longer than the job's timeout of 3s" in _errors(job)


async def test_a_deterministic_sleep_advances_the_virtual_clock_without_waiting(
    client: Client, modules: dict[str, str], storage: Storage, tmp_path: Path
) -> None:
    job = await _run(client, wasm_spec(modules["sleep"], timeout=30))
    assert job.state == JobState.ACCEPTED, _errors(job)
    assert job.result_cid is not None
    result = await storage.fetch(job.result_cid, tmp_path / "result")
    assert (result / "stdout").read_text() == "woke up\n"


async def test_a_module_over_its_memory_limit_fails_naming_the_limit(
    client: Client, modules: dict[str, str]
) -> None:
    job = await _run(client, wasm_spec(modules["alloc"], resources={"memory": "64m"}))
    assert job.state == JobState.FAILED
    assert f"memory reached the job's limit of {64 * 1024**2} bytes" in _errors(job)


async def test_a_module_printing_past_the_results_limit_is_stopped(
    client: Client, modules: dict[str, str]
) -> None:
    job = await _run(client, wasm_spec(modules["flood"]))
    assert job.state == JobState.FAILED
    assert f"exceed this worker's limit of {RESULTS_LIMIT} bytes" in _errors(job)


async def test_a_module_that_is_not_webassembly_fails_clearly(
    client: Client, storage: Storage, tmp_path: Path
) -> None:
    text = tmp_path / "module.wasm"
    text.write_text("#!/bin/sh\necho not wasm\n")
    cid = await storage.add(text)
    job = await _run(client, wasm_spec(cid))
    assert job.state == JobState.FAILED
    assert f"the module {cid} is not a WebAssembly module" in _errors(job)


async def test_a_module_over_the_workers_size_limit_fails_clearly(
    client: Client, storage: Storage, tmp_path: Path
) -> None:
    big = tmp_path / "big.wasm"
    big.write_bytes(b"\0asm\x01\0\0\0" + os.urandom(MODULE_LIMIT))
    cid = await storage.add(big)
    job = await _run(client, wasm_spec(cid))
    assert job.state == JobState.FAILED
    assert f"over this worker's limit of {MODULE_LIMIT} bytes for modules" in _errors(job)


async def test_a_write_to_an_input_is_refused(
    client: Client, storage: Storage, modules: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a").write_text("keep me")
    inputs = await storage.add(folder)
    job = await _run(client, wasm_spec(modules["writein"], inputs=[(inputs, "/in")]))
    assert job.state == JobState.ACCEPTED, _errors(job)
    assert job.exit_code == 0  # the program exits 1 unless all three attempts were refused
    assert job.result_cid is not None
    result = await storage.fetch(job.result_cid, tmp_path / "result")
    assert (result / "stdout").read_text().endswith("refused 3 of 3\n")


async def test_a_python_job_reads_an_input_csv_and_writes_a_result_file(
    client: Client, storage: Storage, tmp_path: Path
) -> None:
    data = tmp_path / "prices.csv"
    data.write_text("item,price\napple,3\npear,4\nplum,5\n")
    data_cid = await storage.add(data)
    helper = tmp_path / "summing.py"
    helper.write_text("def total(rows, column):\n    return sum(int(r[column]) for r in rows)\n")
    script = tmp_path / "report.py"
    script.write_text(
        "import csv, sys, random, time\n"
        "from summing import total\n"
        "rows = list(csv.DictReader(open('/data/prices.csv')))\n"
        "with open('/out/total.txt', 'w') as out:\n"
        "    out.write(f'{sys.argv[1]} {len(rows)} items, total {total(rows, \"price\")}\\n')\n"
        "print('done at', time.time(), random.random())\n"
    )
    job = await run_python(
        client,
        storage,
        script,
        ["prices:"],
        modules=[helper],
        inputs=[(data_cid, "/data/prices.csv")],
        outputs=[("report", "/out")],
        concurrency=2,
        confidence=2,
        wait_timeout=600,
    )
    assert job.state == JobState.ACCEPTED, (job.reason, _errors(job))
    assert job.result_cid is not None
    result = await storage.fetch(job.result_cid, tmp_path / "result")
    assert (result / "report" / "total.txt").read_text() == "prices: 3 items, total 12\n"
    assert (result / "stdout").read_text().startswith("done at 946684800.")


async def test_run_building_blocks_add_a_local_module_and_python_code(
    client: Client, storage: Storage, programs: dict[str, Path], tmp_path: Path
) -> None:
    # what `bacq run --engine wasm ./clock.wasm` and `bacq run python -c CODE` submit
    folder = tmp_path / "in"
    folder.mkdir()
    inputs = await storage.add(folder)
    spec = await cli_spec(
        storage, str(programs["clock"]), inputs=[(inputs, "/in")], outputs=[("o", "/out")]
    )
    assert spec.engine == "wasm"
    assert spec.image.startswith("baf")  # the file's CID, added first
    code = await cli_spec(storage, "python", ["a", "b"], code="import sys; print(sys.argv[1:])")
    assert code.image == "python-3.12"
    assert code.command == ["/job/main.py", "a", "b"]
    for job in [await _run(client, spec), await _run(client, code)]:
        assert job.state == JobState.ACCEPTED, _errors(job)
    assert job.result_cid is not None
    result = await storage.fetch(job.result_cid, tmp_path / "result")
    assert (result / "stdout").read_text() == "['a', 'b']\n"


async def test_bacq_run_engine_wasm_and_run_python_from_the_cli(
    stack: Devstack, programs: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("a\n")
    added = await asyncio.to_thread(run_cli, stack, "ipfs", "add", str(folder))
    assert added.returncode == 0, added.stderr
    done = await asyncio.to_thread(
        run_cli,
        stack,
        "run",
        "--engine",
        "wasm",
        "--no-cache",
        "-v",
        f"{added.stdout.strip()}:/in",
        "-o",
        "o:/out",
        str(programs["clock"]),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "accepted" in done.stdout
    script = tmp_path / "hello.py"
    script.write_text("import sys\nprint('hello from', sys.argv[1])\n")
    done = await asyncio.to_thread(run_cli, stack, "run", "python", str(script), "wasi")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hello from wasi" in done.stdout
    done = await asyncio.to_thread(run_cli, stack, "run", "python", "-c", "print(6 * 7)")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "42" in done.stdout
    # wasm flags on a Docker job are a usage error naming the flag
    done = await asyncio.to_thread(
        run_cli, stack, "run", "--fuel", "5", "bacq-test/busybox", "true"
    )
    assert done.returncode == 2
    assert "--fuel is for wasm jobs" in done.stderr
