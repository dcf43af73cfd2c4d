"""Sections ``cli`` and ``bulk``: the CLI's start-up, a shell loop of ``bacq run --no-wait``
against sequential ``docker run``s, and bulk submission with ``bacq create -f``.

Touches the Docker devstack of bench.run (``cli``), a noop devstack of its own (``bulk``), the
Docker daemon (``docker run --rm``), subprocesses of ``bacq`` and ``bash``, and a scratch
directory.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bacq.client import Client
from bacq.devstack import Devstack
from bench.common import (
    IMAGE,
    TRIVIAL,
    bacq_cli,
    docker_run_argv,
    ratio,
    say,
    stack_env,
    summary,
    timed,
)
from bench.noop_sections import noop_spec, noop_stack


def _bacq_shell() -> str:
    """The ``bacq`` command as a shell would run it (this venv's)."""
    return " ".join(shlex.quote(a) for a in bacq_cli())


def startup(stack: Devstack, runs: int) -> dict[str, Any]:
    """Wall time of ``bacq version``, ``bacq --help`` and ``bacq run --no-wait`` (to the printed
    id), each a fresh process; ``python -c pass`` is the floor no Python CLI goes under."""
    env = stack_env(stack)
    argvs = {
        "python": [sys.executable, "-c", "pass"],
        "version": bacq_cli("version"),
        "help": bacq_cli("--help"),
        "run_no_wait": bacq_cli("run", "--no-wait", IMAGE, "--", *TRIVIAL),
    }
    samples: dict[str, list[float]] = {name: [] for name in argvs}
    job_ids: list[str] = []
    for argv in argvs.values():  # warm the page cache
        timed(argv, env=env)
    say(f"cli: start-up, {runs} interleaved runs of each of {', '.join(argvs)}")
    for _ in range(runs):
        for name, argv in argvs.items():
            elapsed, done = timed(argv, env=env)
            samples[name].append(elapsed)
            if name == "run_no_wait":
                job_ids.append(done.stdout.strip())
    _await(stack, job_ids)  # leave the workers idle for what follows
    return {name: summary(values) for name, values in samples.items()}


def _await(stack: Devstack, job_ids: list[str], timeout: float = 600.0) -> dict[str, int]:
    async def wait() -> dict[str, int]:
        async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
            done = await client.wait_all(job_ids, timeout=timeout)
        states: dict[str, int] = {}
        for job in done.values():
            states[job.state.value] = states.get(job.state.value, 0) + 1
        return states

    return asyncio.run(wait())


def shell_loop(stack: Devstack, jobs: int) -> dict[str, Any]:
    """``jobs`` x ``bacq run --no-wait`` from a bash loop, then awaited until all are final,
    against ``jobs`` sequential ``docker run --rm`` of the same container."""
    env = stack_env(stack)
    loop = (
        f"for i in $(seq {jobs}); do {_bacq_shell()} run --no-wait {IMAGE} -- "
        + " ".join(TRIVIAL)
        + " || exit 1; done"
    )
    say(f"cli: {jobs} x bacq run --no-wait from a shell loop, then awaited")
    start = time.perf_counter()
    submitted, done = timed(["bash", "-c", loop], env=env)
    job_ids = done.stdout.split()
    states = _await(stack, job_ids)
    bacq_s = time.perf_counter() - start
    say(f"cli: {jobs} sequential docker run")
    docker_argv = docker_run_argv(IMAGE, TRIVIAL)
    start = time.perf_counter()
    for _ in range(jobs):
        timed(docker_argv)
    docker_s = time.perf_counter() - start
    return {
        "jobs": jobs,
        "bacq_seconds": bacq_s,
        "bacq_submit_seconds": submitted,
        "docker_seconds": docker_s,
        "ratio": ratio(bacq_s, docker_s),
        "states": states,
    }


def cli(stack: Devstack, runs: int, loop_jobs: int) -> dict[str, Any]:
    return {"startup": startup(stack, runs), "loop": shell_loop(stack, loop_jobs)}


def bulk(args: Any) -> dict[str, Any]:
    """``bacq create -f`` of ``args.bulk_jobs`` noop jobs: a YAML list from a file, and JSON lines
    on stdin; jobs/s from the start of the command to its last printed id."""
    jobs = args.bulk_jobs
    spec = noop_spec(1, args.bid_timeout)
    stack = noop_stack(3, args.max_jobs, args.state_root)
    result: dict[str, Any] = {"jobs": jobs}
    try:
        env = stack_env(stack)
        with tempfile.TemporaryDirectory(prefix="bacq-bench-bulk-") as scratch:
            # jobs that differ (a label each), as a real file's do: the same mapping N times
            # would be one YAML anchor and N aliases, a file a fraction of the size to read
            specs = [{**spec, "labels": {"index": str(i)}} for i in range(jobs)]
            listed = Path(scratch) / "jobs.yaml"
            listed.write_text(yaml.safe_dump(specs, sort_keys=False))
            lines = "".join(json.dumps(s) + "\n" for s in specs)
            for name, argv, stdin in (
                ("yaml_file", bacq_cli("create", "-f", str(listed)), None),
                ("json_lines_stdin", bacq_cli("create", "-f", "-"), lines),
            ):
                say(f"bulk: bacq create -f, {jobs} jobs ({name})")
                start = time.perf_counter()
                done = subprocess.run(
                    argv,
                    input=stdin,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=False,
                )
                elapsed = time.perf_counter() - start
                if done.returncode != 0:
                    raise RuntimeError(
                        f"bacq create exited {done.returncode}: {done.stderr[-600:]}"
                    )
                job_ids = done.stdout.split()
                if len(job_ids) != jobs or len(set(job_ids)) != jobs:
                    raise RuntimeError(f"bacq create printed {len(job_ids)} ids for {jobs} jobs")
                states = _await(stack, job_ids, timeout=max(600.0, jobs / 10))
                result[name] = {
                    "seconds": elapsed,
                    "jobs_per_s": jobs / elapsed,
                    "states": states,
                }
    finally:
        stack.stop()
    return result
