"""Shared pieces of the benchmark harness: statistics, processes, the Docker baseline, job batches.

Touches local processes (``/proc/<pid>``, subprocesses of ``docker``, ``ipfs``, ``bacq``), the
Docker daemon (raw ``docker run --rm``) and the NATS server of a devstack (submissions and one
watch of the ``bacq-jobs`` bucket).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from bacq.client import Client
from bacq.devstack import Devstack, find_ipfs, find_nats_server
from bacq.spec import Resources
from bacq.states import JOB_FINAL
from bacq.worker.executor import DEFAULT_TMPFS, default_container_user

console = Console(stderr=True, highlight=False, soft_wrap=True)

IMAGE = "bacq-test/busybox"
TRIVIAL = ["echo", "hello"]
FINAL_STATES = frozenset(s.value for s in JOB_FINAL)
_STATE = re.compile(rb'"state":"([a-z_]+)"')


def say(message: str) -> None:
    console.print(f"[bold blue][bench][/] {time.strftime('%H:%M:%S')} {message}")


# -- statistics -----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """Raw samples with p50, p95, mean, min and max (seconds, or whatever the samples are)."""
    return {
        "n": len(samples),
        "p50": percentile(samples, 50),
        "p95": percentile(samples, 95),
        "mean": sum(samples) / len(samples) if samples else None,
        "min": min(samples) if samples else None,
        "max": max(samples) if samples else None,
        "samples": [round(s, 6) for s in samples],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# -- processes ------------------------------------------------------------------------------------
def bacq_cli(*args: str) -> list[str]:
    """The real ``bacq`` CLI of this venv (the same as ``.venv/bin/bacq``)."""
    return [sys.executable, "-m", "bacq", *args]


def stack_env(stack: Devstack) -> dict[str, str]:
    """The CLI's environment against ``stack``. Bytecode caches are written and read as in a
    normal install (a PYTHONDONTWRITEBYTECODE of the caller's would make every CLI start-up
    compile bacq's modules again)."""
    env = {**os.environ, **stack.env(), "COLUMNS": "200"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def compile_bacq() -> None:
    """Write the bytecode caches of bacq's modules (what installing it does), so that the CLI's
    start-up is measured as users see it."""
    import compileall

    import bacq

    compileall.compile_dir(Path(bacq.__file__).parent, quiet=1)


def timed(
    argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 600.0
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``argv`` to its end; return its wall time and what it printed. Fails on exit != 0."""
    start = time.perf_counter()
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:6])} … exited {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-600:]}"
        )
    return elapsed, done


def docker_run_argv(
    image: str,
    command: Sequence[str],
    *,
    volumes: Sequence[str] = (),
    resources: Resources | None = None,
) -> list[str]:
    """``docker run --rm`` with the limits and hardening of bacq's DockerExecutor._create.

    Same image and command, cpu (NanoCpus), memory (= memory+swap), pids, read-only root with a
    tmpfs /tmp of the same size and mode, every capability dropped, no-new-privileges, no network,
    the same user. Only what bacq adds for its own bookkeeping (name, labels) differs.
    """
    res = resources or Resources()
    return [
        "docker",
        "run",
        "--rm",
        "--network",
        "none",
        "--user",
        default_container_user(),
        "--read-only",
        "--tmpfs",
        f"/tmp:rw,nosuid,nodev,size={DEFAULT_TMPFS},mode=1777",
        "--memory",
        str(res.memory),
        "--memory-swap",
        str(res.memory),
        "--cpus",
        f"{res.cpu:g}",
        "--pids-limit",
        str(res.pids),
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        *[arg for volume in volumes for arg in ("-v", volume)],
        image,
        *command,
    ]


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS (bytes) of a live process; empty when it is gone."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0]) * 1024
    return found


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds a live process has used (0.0 when it is gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


# -- NATS's own counters -------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def monitor_nats(stack: Devstack) -> int:
    """Give the (not yet started) devstack's nats-server an HTTP monitoring port; returns it.
    ``/varz`` then counts every message in and out of the server, JetStream's included."""
    port = free_port()
    nats = stack.nats
    start = nats.start

    def start_with_monitor(timeout: float = 20.0) -> str:
        # Devstack.start sets the server's arguments (its config) just before this call
        nats.args = [*nats.args, "-m", str(port)]
        return start(timeout)

    nats.start = start_with_monitor  # type: ignore[method-assign]  # this devstack's alone
    return port


def nats_counters(port: int | None) -> dict[str, int]:
    """nats-server's message and byte counters, and its JetStream API calls (empty when the
    monitoring port does not answer)."""
    import urllib.request

    if port is None:
        return {}
    found: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=10) as answer:
            varz = json.loads(answer.read())
        for key in ("in_msgs", "out_msgs", "in_bytes", "out_bytes"):
            found[key] = int(varz.get(key, 0))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/jsz", timeout=10) as answer:
            jsz = json.loads(answer.read())
        found["js_api_calls"] = int((jsz.get("api") or {}).get("total", 0))
    return found


def per_job(before: dict[str, int], after: dict[str, int], jobs: int) -> dict[str, float]:
    """Counter deltas divided by ``jobs``."""
    if jobs <= 0:
        return {}
    return {k: (after[k] - before[k]) / jobs for k in after if k in before}


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def service_pids(stack: Devstack) -> dict[str, int]:
    pids = {}
    for name, service in stack.services.items():
        if service.proc is not None and service.proc.poll() is None:
            pids[name] = service.proc.pid
    if stack.nats.proc is not None:
        pids["nats-server"] = stack.nats.proc.pid
    for i, node in enumerate(stack.kubo):
        if node.proc is not None:
            pids[f"kubo{i}"] = node.proc.pid
    return pids


def memory_report(stack: Devstack) -> dict[str, Any]:
    """Peak RSS (VmHWM, bytes) of the requester, the verifier, each worker, nats-server, kubo."""
    peaks = {name: proc_status(pid).get("VmHWM") for name, pid in service_pids(stack).items()}
    workers = [v for k, v in peaks.items() if k.startswith("w") and v is not None]
    return {
        "requester": peaks.get("requester"),
        "verifier": peaks.get("verifier"),
        "nats_server": peaks.get("nats-server"),
        "worker_max": max(workers) if workers else None,
        "worker_mean": sum(workers) / len(workers) if workers else None,
        "per_process": peaks,
    }


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def _git(repo: Path, *args: str) -> str:
    return _version(["git", "-C", str(repo), *args])


def _dirty(repo: Path) -> list[str]:
    """Files of ``repo`` changed since its commit (an editable install runs them as they are)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ["?"]
    return [line[3:] for line in done.stdout.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    import bacq

    bacq_repo = Path(bacq.__file__).resolve().parent.parent
    bench_repo = Path(__file__).resolve().parent.parent
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        ),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "loadavg_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "docker": _version(["docker", "version", "-f", "{{.Server.Version}}"]),
        "kubo": _version([find_ipfs(), "version", "--number"]),
        "nats_server": _version([find_nats_server(), "--version"]),
        "bacq_repo": str(bacq_repo),
        "bacq_commit": _git(bacq_repo, "rev-parse", "HEAD"),
        # the last commit that changed bacq/ (the code measured), beside the checkout's HEAD
        "bacq_code_commit": _git(bacq_repo, "log", "-1", "--format=%H", "--", "bacq"),
        "bacq_uncommitted": _dirty(bacq_repo),
        "bench_commit": _git(bench_repo, "rev-parse", "HEAD"),
    }


# -- job batches through the Python client --------------------------------------------------------
class FinalWatcher:
    """One watch on the ``bacq-jobs`` bucket: when each job was first seen in a final state.

    A single ordered consumer instead of one ``client.wait`` per job (10,000 watches, or polling
    10,000 keys, would be load of its own). Values are read as plain JSON (state and reason).
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.final: dict[str, tuple[float, str, str]] = {}  # id → (unix time, state, reason)
        self.updates = 0
        self.verified_by: collections.Counter[str] = collections.Counter()  # node → results
        self.verified_count: dict[str, int] = {}  # id → verified executions when first final
        self.changed_after_final: set[str] = set()  # ids whose state changed once final
        self.changed = asyncio.Event()
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._watcher = await self.client.bus.jobs.watchall()
        self._task = asyncio.create_task(self._run(), name="final-watcher")

    async def _run(self) -> None:
        while True:
            try:
                entry = await self._watcher.updates(timeout=5.0)
            except Exception as exc:  # the nats-py timeout is its own class; keep watching
                if type(exc).__name__ == "TimeoutError":
                    continue
                raise
            if entry is None or not entry.value:
                continue
            self.updates += 1
            # the job's state without decoding the record (at 100,000 jobs the watch delivers
            # about a million updates to this process, which shares the cores it measures): the
            # record's first "state" key is the job's (the spec has none, executions come after,
            # and a quote inside a string is escaped); the whole record only once final
            found = _STATE.search(entry.value)
            state = found.group(1).decode() if found else json.loads(entry.value).get("state")
            seen = self.final.get(entry.key)
            if seen is not None and state != seen[1]:
                self.changed_after_final.add(entry.key)  # e.g. accepted, then accepted again
            if state in FINAL_STATES and entry.key not in self.final:
                record = json.loads(entry.value)
                # when NATS stored the update (same machine, same clock): a client that falls
                # behind in reading the watch does not lengthen the measured times
                created = getattr(entry, "created", None)
                at = created.timestamp() if created is not None else time.time()
                self.final[entry.key] = (at, state, record.get("reason", ""))
                verified = 0
                for node, execution in (record.get("executions") or {}).items():
                    if execution.get("state") == "verified":
                        self.verified_by[node] += 1
                        verified += 1
                self.verified_count[entry.key] = verified
                self.changed.set()

    async def wait_for(self, ids: set[str], *, stall: float, timeout: float) -> None:
        """Until every id in ``ids`` is final, no job became final for ``stall`` seconds, or
        ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        last_progress, done = time.monotonic(), -1
        while True:
            now = time.monotonic()
            count = sum(1 for i in ids if i in self.final)
            if count != done:
                done, last_progress = count, now
            if count == len(ids) or now - last_progress > stall or now > deadline:
                return
            # a look twice a second, not at every final job: counting is O(jobs), and 10,000
            # wake-ups made this client use as much CPU as the requester. The times measured
            # come from NATS's timestamps, so the polling does not coarsen them.
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=1.0)
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()


@dataclass
class Batch:
    """What happened to N jobs submitted at once."""

    jobs: int
    seconds: float = 0.0  # first submission → last job final
    submit_seconds: float = 0.0  # first submission → last submission answered
    latencies: list[float] = field(default_factory=list)  # submit → final, per final job
    states: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    submit_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: int = 0
    lost_states: collections.Counter[str] = field(default_factory=collections.Counter)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process in the batch
    watch_updates: int = 0
    verified_by: dict[str, int] = field(default_factory=dict)  # verified results per worker
    submission: str = "each"  # "each": one request per job; "bulk": submit_many
    duplicate_ids: int = 0  # ids the requester gave twice for distinct submissions
    changed_after_final: int = 0  # jobs whose state changed after it was final
    over_verified: int = 0  # jobs with more verified executions than their concurrency
    nats: dict[str, float] = field(default_factory=dict)  # nats-server counters per job

    def as_dict(self) -> dict[str, Any]:
        final = sum(self.states.values())
        return {
            "submission": self.submission,
            "duplicate_ids": self.duplicate_ids,
            "changed_after_final": self.changed_after_final,
            "over_verified": self.over_verified,
            # none accepted twice: no id twice, no verdict changed, no extra verified execution
            "accepted_twice": self.duplicate_ids + self.changed_after_final + self.over_verified,
            "nats_per_job": {k: round(v, 2) for k, v in self.nats.items()},
            "cpu_ms_per_job": {
                k: round(1000 * v / self.jobs, 3) for k, v in self.cpu.items() if self.jobs
            },
            "jobs": self.jobs,
            "seconds": round(self.seconds, 4),
            "jobs_per_s": final / self.seconds if self.seconds > 0 else None,
            "submit_seconds": round(self.submit_seconds, 4),
            "submits_per_s": self.jobs / self.submit_seconds if self.submit_seconds else None,
            "accepted": self.states.get("accepted", 0),
            "failed": final - self.states.get("accepted", 0),
            "lost": self.lost,
            "submit_errors": sum(self.submit_errors.values()),
            "states": dict(self.states),
            "lost_states": dict(self.lost_states.most_common(5)),
            "failure_reasons": dict(self.reasons.most_common(5)),
            "submit_error_kinds": dict(self.submit_errors.most_common(5)),
            "latency": summary(self.latencies),
            "cpu_seconds": {k: round(v, 2) for k, v in self.cpu.items()},
            "watch_updates": self.watch_updates,
            "verified_by_worker": dict(sorted(self.verified_by.items())),
        }


async def run_batch(
    stack: Devstack,
    spec: dict[str, Any],
    jobs: int,
    *,
    parallel: int = 200,
    stall: float = 120.0,
    timeout: float = 3600.0,
    bulk: bool = False,
    nats_port: int | None = None,
) -> Batch:
    """Submit ``jobs`` copies of ``spec`` at once (at most ``parallel`` submissions in flight;
    ``bulk``: in batches, ``Client.submit_many``, and every job's latency counts from the start
    of the submission), then wait until each is final. Jobs not final when it gives up are
    counted as lost. ``nats_port``: nats-server's monitoring port, for messages per job."""
    batch = Batch(jobs=jobs, submission="bulk" if bulk else "each")
    concurrency = int(spec.get("concurrency", 1))
    pids = service_pids(stack)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    own_before = _own_cpu()
    counters_before = nats_counters(nats_port)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        watcher = FinalWatcher(client)
        await watcher.start()
        try:
            gate = asyncio.Semaphore(parallel)
            submitted: dict[str, float] = {}

            async def one() -> None:
                async with gate:
                    started = time.time()
                    try:
                        job_id = await client.submit(spec, timeout=30.0, attempts=3)
                    except Exception as exc:
                        batch.submit_errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                        return
                    submitted[job_id] = started

            async def many() -> None:
                try:
                    ids = await client.submit_many([spec] * jobs, timeout=120.0)
                except Exception as exc:
                    batch.submit_errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += jobs
                    return
                batch.duplicate_ids = len(ids) - len(set(ids))
                submitted.update((job_id, start) for job_id in ids)

            start = time.time()
            if bulk:
                await many()
            else:
                await asyncio.gather(*(one() for _ in range(jobs)))
                batch.duplicate_ids = jobs - sum(batch.submit_errors.values()) - len(submitted)
            batch.submit_seconds = time.time() - start
            await watcher.wait_for(set(submitted), stall=stall, timeout=timeout)
            last = start
            for job_id, started in submitted.items():
                seen = watcher.final.get(job_id)
                if seen is None:  # the watch may have missed it: ask once before calling it lost
                    record = await client.job(job_id)
                    if record.final:
                        seen = (record.updated_at.timestamp(), record.state.value, record.reason)
                    else:
                        batch.lost += 1
                        batch.lost_states[f"{record.state.value}: {record.reason[:80]}"] += 1
                        continue
                at, state, reason = seen
                batch.states[state] += 1
                if state != "accepted":
                    batch.reasons[reason.split(";")[0][:100]] += 1
                batch.latencies.append(at - started)
                last = max(last, at)
            batch.seconds = last - start
            batch.watch_updates = watcher.updates
            batch.verified_by = dict(watcher.verified_by)
            batch.changed_after_final = len(watcher.changed_after_final & set(submitted))
            batch.over_verified = sum(
                1 for i in submitted if watcher.verified_count.get(i, 0) > concurrency
            )
        finally:
            await watcher.stop()
    batch.nats = per_job(counters_before, nats_counters(nats_port), jobs)
    batch.cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    batch.cpu["bench (client)"] = _own_cpu() - own_before
    return batch
