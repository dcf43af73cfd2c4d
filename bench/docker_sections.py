"""Sections 1, 2 and 5: bacq with real containers against raw ``docker run`` and the kubo CLI.

Touches one devstack (3 Docker workers, 2 kubo nodes, started by bench.run), the Docker daemon
(``docker run --rm``), the kubo CLI against the devstack's kubo nodes, and a scratch directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bacq.auth import NatsOptions
from bacq.client import Client
from bacq.devstack import Devstack, find_ipfs
from bench.common import (
    IMAGE,
    TRIVIAL,
    bacq_cli,
    docker_run_argv,
    ratio,
    run_batch,
    say,
    stack_env,
    summary,
    timed,
)


# -- 1. overhead per job ---------------------------------------------------------------------------
def _bacq_run_argv(concurrency: int) -> list[str]:
    # --output json: no live view, no progress lines, the final job record on stdout (its state
    # is checked); without a terminal `bacq run` already draws no live view
    extra = ["--concurrency", "3", "--verifier", "deterministic"] if concurrency == 3 else []
    return bacq_cli("run", "--output", "json", *extra, IMAGE, "--", *TRIVIAL)


def _bacq_run(argv: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    elapsed, done = timed(argv, env=env, timeout=300)
    job = json.loads(done.stdout)
    if job.get("state") != "accepted":
        raise RuntimeError(f"bacq run ended {job.get('state')}: {job.get('reason')}")
    return elapsed, job


async def _client_job(nats_url: str, spec: dict[str, Any], options: NatsOptions) -> float:
    """Submit → final through the Python client (no CLI process): the orchestration part."""
    async with await Client.connect(nats_url, options=options) as client:
        start = time.perf_counter()
        job = await client.wait(await client.submit(spec), timeout=300)
        elapsed = time.perf_counter() - start
    if job.state.value != "accepted":
        raise RuntimeError(f"job ended {job.state.value}: {job.reason}")
    return elapsed


def _docker_parallel(argv: list[str], n: int) -> float:
    """Wall time of ``n`` identical ``docker run``s started at once (until the slowest ends)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        for future in [pool.submit(timed, argv, timeout=300) for _ in range(n)]:
            future.result()
    return time.perf_counter() - start


def overhead(stack: Devstack, runs: int) -> dict[str, Any]:
    """``bacq run`` (the CLI, as a subprocess) against raw ``docker run --rm``, interleaved."""
    env = stack_env(stack)
    docker_argv = docker_run_argv(IMAGE, TRIVIAL)
    result: dict[str, Any] = {
        "image": IMAGE,
        "command": TRIVIAL,
        "docker_argv": docker_argv,
        "runs": runs,
    }
    # warm up: the image, docker-py connections and kubo on every worker (a concurrency-3 job
    # reaches all three), the CLI's imports in the page cache
    say("overhead: warming up (one job on every worker, one raw docker run)")
    _bacq_run(_bacq_run_argv(3), env)
    _bacq_run(_bacq_run_argv(1), env)
    timed(docker_argv)
    # what a bacq run pays before it submits anything: the CLI's Python imports
    startups = [timed(bacq_cli("version"), env=env)[0] for _ in range(min(5, runs))]
    result["cli_startup"] = summary(startups)
    for concurrency in (1, 3):
        argv = _bacq_run_argv(concurrency)
        spec: dict[str, Any] = {"image": IMAGE, "command": TRIVIAL, "concurrency": concurrency}
        bacq_s: list[float] = []
        client_s: list[float] = []
        docker_s: list[float] = []
        workers: dict[str, int] = {}
        errors: list[str] = []
        say(
            f"overhead: concurrency {concurrency}, {runs} interleaved runs of bacq run, the "
            "Python client and docker run"
        )
        for i in range(runs):
            try:
                elapsed, job = _bacq_run(argv, env)
                bacq_s.append(elapsed)
                for node, execution in job.get("executions", {}).items():
                    if execution.get("state") == "verified":
                        workers[node] = workers.get(node, 0) + 1
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                errors.append(str(exc)[:300])
            try:
                client_s.append(
                    asyncio.run(_client_job(stack.nats.url, spec, stack.client_options()))
                )
            except (RuntimeError, TimeoutError) as exc:
                errors.append(f"client: {exc}"[:300])
            if concurrency == 1:
                docker_s.append(timed(docker_argv)[0])
            else:
                docker_s.append(_docker_parallel(docker_argv, 3))
            if (i + 1) % 5 == 0 or i + 1 == runs:
                say(
                    f"  {i + 1}/{runs}: bacq p50 {_p50(bacq_s):.3f}s, "
                    f"docker p50 {_p50(docker_s):.3f}s"
                )
        b, d = summary(bacq_s), summary(docker_s)
        result[f"c{concurrency}"] = {
            "bacq_argv": argv,
            "baseline": "docker run --rm"
            if concurrency == 1
            else "3 docker run --rm started at once; wall time of the slowest",
            "bacq": b,
            "docker": d,
            # the same job through bacq.client (submit → final, no CLI process): what the
            # orchestration costs without the CLI's start-up
            "bacq_client": summary(client_s),
            "ratio_p50": ratio(b["p50"], d["p50"]),
            "ratio_p95": ratio(b["p95"], d["p95"]),
            "errors": errors,
            "verified_by_worker": workers,
        }
    return result


def _p50(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


# -- 2. throughput with Docker ------------------------------------------------------------------
def throughput(stack: Devstack, jobs: int, slots: int, bid_timeout: float | None) -> dict[str, Any]:
    """N jobs at once to the workers (``slots`` job slots in all) against N raw ``docker run``s
    in a pool of ``slots`` threads."""
    spec: dict[str, Any] = {"image": IMAGE, "command": TRIVIAL}
    if bid_timeout is not None:
        spec["bid_timeout"] = bid_timeout
    say(f"throughput: {jobs} jobs at once through bacq ({slots} slots)")
    batch = asyncio.run(run_batch(stack, spec, jobs, parallel=jobs, stall=180.0))
    bacq = batch.as_dict()
    say(
        f"  bacq: {bacq['jobs_per_s'] or 0:.2f} jobs/s; accepted {bacq['accepted']}, "
        f"failed {bacq['failed']}, lost {bacq['lost']}"
    )
    say(f"throughput: {jobs} raw docker runs, {slots} at a time")
    argv = docker_run_argv(IMAGE, TRIVIAL)
    start = time.perf_counter()
    errors = 0
    with ThreadPoolExecutor(slots) as pool:
        for future in [pool.submit(timed, argv, timeout=300) for _ in range(jobs)]:
            try:
                future.result()
            except (RuntimeError, subprocess.TimeoutExpired):
                errors += 1
    raw_seconds = time.perf_counter() - start
    raw = {
        "jobs": jobs,
        "parallel": slots,
        "seconds": raw_seconds,
        "jobs_per_s": (jobs - errors) / raw_seconds,
        "errors": errors,
    }
    say(f"  docker: {raw['jobs_per_s']:.2f} jobs/s")
    return {
        "jobs": jobs,
        "slots": slots,
        "spec": spec,
        "bacq": bacq,
        "docker": raw,
        "ratio": ratio(bacq["jobs_per_s"], raw["jobs_per_s"]),
    }


# -- 5. data in and out ---------------------------------------------------------------------------
def _random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left > 0:
            chunk = os.urandom(min(left, 4 * 1024 * 1024))
            digest.update(chunk)
            fh.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


async def _api_add_get(api: str, file: Path, result_cid: str, out: Path) -> tuple[float, float]:
    """``Storage.add`` of ``file`` and ``Storage.fetch`` of ``result_cid``, each timed with its
    connection to kubo (what a program using bacq's API pays)."""
    from bacq.storage import Storage

    start = time.perf_counter()
    storage = await Storage.connect(api)
    try:
        await storage.add(file)
    finally:
        await storage.close()
    added = time.perf_counter() - start
    start = time.perf_counter()
    storage = await Storage.connect(api)
    try:
        await storage.fetch(result_cid, out)
    finally:
        await storage.close()
    return added, time.perf_counter() - start


def data(stack: Devstack, megabytes: int, runs: int) -> dict[str, Any]:
    """A file of ``megabytes`` MiB into a job and back out, against ``ipfs add`` + ``ipfs get``."""
    size = megabytes * 1024 * 1024
    env = stack_env(stack)
    ipfs = find_ipfs()
    node0 = {**os.environ, "IPFS_PATH": str(stack.kubo[0].repo)}
    node1 = {**os.environ, "IPFS_PATH": str(stack.kubo[-1].repo)}
    scratch = Path(tempfile.mkdtemp(prefix="bacq-bench-data-"))
    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "ipfs_add",
            "ipfs_get",
            "ipfs_get_other_node",
            "ipfs_get_result",
            "baseline_total",
            "bacq_add",
            "bacq_run",
            "bacq_get",
            "bacq_total",
            "api_add",
            "api_get",
        )
    }
    ran_on: list[str] = []
    try:
        for run in range(runs):
            say(f"data: run {run + 1}/{runs}, {megabytes} MiB")
            # two different files, so that neither path finds the other's blocks in kubo already
            base_file, bacq_file = scratch / f"base{run}.bin", scratch / f"bacq{run}.bin"
            base_sum = _random_file(base_file, size)
            bacq_sum = _random_file(bacq_file, size)

            # baseline: the kubo CLI, on the devstack's first node (bacq's CLI node too)
            t_add, done = timed(
                [ipfs, "add", "-Q", "--cid-version", "1", "--pin=true", str(base_file)], env=node0
            )
            cid = done.stdout.strip()
            out = scratch / f"base{run}-get"
            t_get, _ = timed([ipfs, "get", cid, "-o", str(out)], env=node0)
            if _sha256(out) != base_sum:
                raise RuntimeError("ipfs get returned different bytes")
            out_other = scratch / f"base{run}-get-other"
            t_other = (
                timed([ipfs, "get", cid, "-o", str(out_other)], env=node1)[0]
                if len(stack.kubo) > 1
                else float("nan")
            )
            samples["ipfs_add"].append(t_add)
            samples["ipfs_get"].append(t_get)
            samples["ipfs_get_other_node"].append(t_other)
            samples["baseline_total"].append(t_add + t_get)

            # bacq: add with the CLI, a job that copies the input to an output folder, get
            b_add, done = timed(bacq_cli("ipfs", "add", str(bacq_file)), env=env)
            in_cid = done.stdout.strip()
            b_run, done = timed(
                bacq_cli(
                    "run",
                    "--output",
                    "json",
                    "-v",
                    f"{in_cid}:/in/data.bin",
                    "-o",
                    "out:/out",
                    IMAGE,
                    "--",
                    "cp",
                    "/in/data.bin",
                    "/out/data.bin",
                ),
                env=env,
                timeout=900,
            )
            job = json.loads(done.stdout)
            if job.get("state") != "accepted" or job.get("exit_code") != 0:
                raise RuntimeError(f"data job ended {job.get('state')}: {job.get('reason')}")
            ran_on += [n for n, e in job["executions"].items() if e.get("state") == "verified"]
            got = scratch / f"bacq{run}-get"
            b_get, _ = timed(
                bacq_cli("get", job["id"], "--output-dir", str(got)), env=env, timeout=900
            )
            if _sha256(got / "out" / "data.bin") != bacq_sum:
                raise RuntimeError("bacq get returned different bytes than were added")
            # the baseline of `bacq get`: kubo's CLI getting the same result from the same node,
            # from the same state: the blocks bacq get brought over from the worker's node are
            # collected first (the worker pins the result on its own node)
            subprocess.run(
                [ipfs, "repo", "gc", "--quiet"], env=node0, capture_output=True, check=True
            )
            out_result = scratch / f"result{run}-get"
            t_result, _ = timed([ipfs, "get", job["result_cid"], "-o", str(out_result)], env=node0)
            if _sha256(out_result / "out" / "data.bin") != bacq_sum:
                raise RuntimeError("ipfs get of the result returned different bytes")
            samples["ipfs_get_result"].append(t_result)
            shutil.rmtree(out_result, ignore_errors=True)

            # the same data path through the Python API: no CLI start-up, no NATS
            api_file, api_got = scratch / f"api{run}.bin", scratch / f"api{run}-get"
            _random_file(api_file, size)
            a_add, a_get = asyncio.run(
                _api_add_get(stack.ipfs_api, api_file, job["result_cid"], api_got)
            )
            if _sha256(api_got / "out" / "data.bin") != bacq_sum:
                raise RuntimeError("Storage.fetch returned different bytes than were added")
            samples["api_add"].append(a_add)
            samples["api_get"].append(a_get)
            api_file.unlink()
            shutil.rmtree(api_got, ignore_errors=True)
            samples["bacq_add"].append(b_add)
            samples["bacq_run"].append(b_run)
            samples["bacq_get"].append(b_get)
            samples["bacq_total"].append(b_add + b_run + b_get)
            say(
                f"  ipfs add {t_add:.2f}s + get {t_get:.2f}s (other node {t_other:.2f}s, the "
                f"job's result {t_result:.2f}s); bacq add {b_add:.2f}s + run {b_run:.2f}s + get "
                f"{b_get:.2f}s; "
                f"API add {a_add:.2f}s + get {a_get:.2f}s"
            )
            for path in (base_file, bacq_file, out, out_other):
                path.unlink(missing_ok=True)
            shutil.rmtree(got, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result: dict[str, Any] = {"megabytes": megabytes, "runs": runs, "ran_on": ran_on}
    result.update({k: summary(v) for k, v in samples.items()})
    result["ratio_total_p50"] = ratio(result["bacq_total"]["p50"], result["baseline_total"]["p50"])
    return result
