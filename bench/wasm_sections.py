"""wasm sections: a trivial wasm job and a trivial Python job next to the same Docker job, and the
orchestration rate with ``bacq worker --executor wasm``.

Touches the Docker devstack of bench.run (its workers run wasm jobs too), devstacks of its own for
the rate (nats-server, one kubo node, requester, verifier, wasm workers), a scratch directory, and
the workers' compile cache (the Python runtime is compiled once per machine, before timing).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import wasmtime

from bacq.devstack import Devstack
from bench.common import IMAGE, TRIVIAL, bacq_cli, memory_report, run_batch, say, stack_env, timed
from bench.common import summary as stats

# a WASI command that prints "hello\n": the same output as the Docker job's `echo hello`
HELLO_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def hello_module(folder: Path) -> Path:
    path = folder / "hello.wasm"
    path.write_bytes(wasmtime.wat2wasm(HELLO_WAT))
    return path


def _add(path: Path, env: dict[str, str]) -> str:
    return timed(bacq_cli("ipfs", "add", str(path)), env=env)[1].stdout.strip().split()[-1]


def _specs(module_cid: str, script_cid: str) -> dict[str, dict[str, Any]]:
    # no_cache: an equal deterministic job would otherwise be answered at once (known answers)
    return {
        "docker": {"image": IMAGE, "command": TRIVIAL},
        "wasm": {"engine": "wasm", "image": module_cid, "no_cache": True},
        "python": {
            "engine": "wasm",
            "image": "python-3.12",
            "command": ["/job/main.py"],
            "inputs": [{"cid": script_cid, "path": "/job"}],
            "no_cache": True,
        },
    }


def _create(path: Path, env: dict[str, str]) -> float:
    elapsed, done = timed(
        bacq_cli("create", "-f", str(path), "--wait", "--output", "json"), env=env, timeout=600
    )
    job = json.loads(done.stdout)
    if job.get("state") != "accepted":
        raise RuntimeError(f"job ended {job.get('state')}: {job.get('reason')}")
    return elapsed


def engines(stack: Devstack, runs: int) -> dict[str, Any]:
    """The same trivial job (print hello) on Docker, wasm and Python, through the CLI
    (``bacq create -f JOB --wait``, the job-file form of ``bacq run``), interleaved."""
    env = stack_env(stack)
    with tempfile.TemporaryDirectory(prefix="bacq-bench-wasm-") as tmp:
        folder = Path(tmp)
        module_cid = _add(hello_module(folder), env)
        script = folder / "job"
        script.mkdir()
        (script / "main.py").write_text("print('hello')\n")
        script_cid = _add(script, env)
        files = {}
        for name, spec in _specs(module_cid, script_cid).items():
            files[name] = folder / f"{name}.json"
            files[name].write_text(json.dumps(spec))
        say("wasm: warming up (image, module and Python runtime compiled on every worker)")
        first = {name: _create(path, env) for name, path in files.items()}
        samples: dict[str, list[float]] = {name: [] for name in files}
        errors: list[str] = []
        say(f"wasm: {runs} interleaved runs each of a Docker, a wasm and a Python job")
        for _ in range(runs):
            for name, path in files.items():
                try:
                    samples[name].append(_create(path, env))
                except (RuntimeError, ValueError) as exc:
                    errors.append(f"{name}: {exc}"[:300])
    result: dict[str, Any] = {"runs": runs, "first": first, "errors": errors}
    for name, values in samples.items():
        result[name] = stats(values)
    say(
        "  p50: "
        + ", ".join(f"{n} {result[n]['p50'] or 0:.3f}s" for n in samples)
        + f" (first runs, compiling: {', '.join(f'{n} {v:.1f}s' for n, v in first.items())})"
    )
    return result


def wasm_stack(workers: int, max_jobs: int, state_root: Path | None) -> Devstack:
    state_dir = None
    if state_root is not None:
        state_dir = state_root / f"wasm-{workers}w-{time.strftime('%H%M%S')}"
    stack = Devstack(
        workers=workers,
        kubo_nodes=1,
        max_jobs=max_jobs,
        worker_args=[
            "--executor",
            "wasm",
            "--cpu",
            str(max_jobs),
            "--memory",
            f"{max_jobs * 512}m",
        ],
        state_dir=state_dir,
    )
    stack.start()
    return stack


def orchestration(args: Any) -> dict[str, Any]:
    """``wasm_jobs`` trivial wasm jobs at once through 3 ``--executor wasm`` workers."""
    stack = wasm_stack(3, args.wasm_max_jobs, args.state_root)
    try:
        env = stack_env(stack)
        with tempfile.TemporaryDirectory(prefix="bacq-bench-wasm-") as tmp:
            module_cid = _add(hello_module(Path(tmp)), env)
        spec = _specs(module_cid, "")["wasm"]
        say(f"wasm orchestration: {args.wasm_jobs} jobs at once, 3 wasm workers")
        batch = asyncio.run(
            run_batch(stack, spec, args.wasm_jobs, parallel=args.submit_parallel, stall=args.stall)
        )
        result = batch.as_dict()
        result.update(workers=3, max_jobs=args.wasm_max_jobs, memory=memory_report(stack))
        say(
            f"  {result['jobs_per_s'] or 0:.1f} jobs/s; accepted {result['accepted']}, "
            f"failed {result['failed']}, lost {result['lost']}"
        )
        return result
    finally:
        stack.stop()
