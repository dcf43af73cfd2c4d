"""Job containers are hardened: each limit is checked from inside a real container (real dockerd).

The machine runs cgroup v1 (dockerd's cgroupfs driver), so limits are read from the v1 files
the container sees under /sys/fs/cgroup. A results limit stops oversized output with a clear error,
while the container runs: a job printing gigabytes is killed and its worker's memory stays flat.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker.errors
import pytest
from docker.types import Mount

from bacq.client import Client
from bacq.devstack import Devstack
from bacq.errors import ExecutionError, ResultsTooLarge
from bacq.spec import JobSpec, parse_spec
from bacq.states import JobState
from bacq.worker.executor import ContainerResult, DockerExecutor, bind
from tests.scenarios import BUSYBOX

PROBE = r"""
echo "uid=$(id -u)"
echo "gid=$(id -g)"
echo "memory=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
echo "memsw=$(cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes 2>/dev/null || echo none)"
echo "pids=$(cat /sys/fs/cgroup/pids/pids.max)"
echo "cfs_quota=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)"
echo "cfs_period=$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"
echo "links=$(ip -o link | awk -F': ' '{print $2}' | tr '\n' ',')"
grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status | tr -d '\t' | sed 's/:/=/'
if touch /written-to-root 2>/dev/null; then echo root_write=yes; else echo root_write=no; fi
if echo hi > /tmp/scratch && [ "$(cat /tmp/scratch)" = hi ]; then echo tmp_write=yes; \
    else echo tmp_write=no; fi
echo "tmp_mount=$(grep ' /tmp ' /proc/mounts)"
if echo out > /out/file; then echo out_write=yes; else echo out_write=no; fi
"""

pytestmark = pytest.mark.devstack  # every test here runs real containers


@pytest.fixture(scope="module")
def executor() -> Iterator[DockerExecutor]:
    ex = DockerExecutor.from_env()
    try:
        yield ex
    finally:
        ex.close()


def _spec(script: str, **extra: object) -> JobSpec:
    return parse_spec(
        {
            "image": "bacq-test/busybox",
            "command": ["sh", "-c", script],
            "resources": {"cpu": 0.5, "memory": "64m", "pids": 64},
            "timeout": 60,
            **extra,
        }
    )


def _name(what: str) -> str:
    return f"bacq-test-{what}-{uuid.uuid4().hex[:8]}"


async def _run(
    ex: DockerExecutor, spec: JobSpec, name: str, logs: Path, mounts: list[Mount] | None = None
) -> ContainerResult:
    return await ex.run_container(
        spec, name=_name(name), mounts=mounts or [], labels={}, logs_dir=logs / name
    )


def _facts(stdout: bytes) -> dict[str, str]:
    facts = {}
    for line in stdout.decode().splitlines():
        key, _, value = line.partition("=")
        facts[key.strip()] = value.strip()
    return facts


async def test_a_job_container_holds_every_default_limit_from_inside(
    executor: DockerExecutor, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = await _run(
        executor, _spec(PROBE), "limits", tmp_path, [bind(out, "/out", read_only=False)]
    )
    facts = _facts(result.stdout.read_bytes())
    assert result.exit_code == 0, result.stderr.read_text()
    # a non-root user: the worker's own uid, or nobody when the worker runs as root
    assert facts["uid"] != "0"
    assert facts["gid"] != "0"
    # memory, swap, pids and cpu limits, from the container's own cgroup files
    assert int(facts["memory"]) == 64 * 1024**2
    assert facts["memsw"] in ("none", str(64 * 1024**2))
    assert facts["pids"] == "64"
    assert int(facts["cfs_quota"]) * 2 == int(facts["cfs_period"])
    # no network: loopback only
    assert facts["links"].rstrip(",").split(",") == ["lo"]
    # every capability dropped, no new privileges
    assert int(facts["CapEff"], 16) == 0
    assert int(facts["CapPrm"], 16) == 0
    assert int(facts["CapBnd"], 16) == 0
    assert facts["NoNewPrivs"] == "1"
    # read-only root, a small writable tmpfs on /tmp, the output folder writable
    assert facts["root_write"] == "no"
    assert facts["tmp_write"] == "yes"
    assert facts["tmp_mount"].startswith("tmpfs /tmp tmpfs")
    assert "size=65536k" in facts["tmp_mount"]
    assert facts["out_write"] == "yes"
    assert (out / "file").read_text() == "out\n"


async def test_a_job_that_asks_for_network_is_refused_by_a_worker_that_does_not_allow_it(
    executor: DockerExecutor, tmp_path: Path
) -> None:
    spec = _spec("ip -o link", network=True)
    assert executor.why_not(spec) is not None
    with pytest.raises(ExecutionError, match="needs network access"):
        await _run(executor, spec, "nonet", tmp_path)


async def test_a_worker_that_allows_network_gives_it_only_to_jobs_that_ask(
    tmp_path: Path,
) -> None:
    ex = DockerExecutor.from_env(allow_network=True)
    links = "ip -o link | awk -F': ' '{print $2}'"
    try:
        asks = await _run(ex, _spec(links, network=True), "net", tmp_path)
        silent = await _run(ex, _spec(links), "net2", tmp_path)
    finally:
        ex.close()
    assert any(link.startswith("eth0") for link in asks.stdout.read_text().split())
    assert silent.stdout.read_text().split() == ["lo"]


async def test_results_over_the_workers_limit_fail_with_a_clear_error(tmp_path: Path) -> None:
    ex = DockerExecutor.from_env(results_limit=100_000)
    out = tmp_path / "out"
    out.mkdir()
    try:
        mounts = [bind(out, "/out", read_only=False)]
        small = await _run(
            ex, _spec("head -c 50000 /dev/zero > /out/small"), "small", tmp_path, mounts
        )
        assert small.exit_code == 0
        with pytest.raises(ResultsTooLarge, match=r"exceed this worker's limit of 100000 bytes"):
            await _run(ex, _spec("head -c 200000 /dev/zero > /out/big"), "big", tmp_path, mounts)
        with pytest.raises(ResultsTooLarge, match="stdout and stderr"):
            await _run(ex, _spec("head -c 200000 /dev/zero"), "bigout", tmp_path)
    finally:
        ex.close()


async def test_a_job_that_keeps_writing_is_killed_once_over_the_limit(tmp_path: Path) -> None:
    ex = DockerExecutor.from_env(results_limit=1_000_000)
    out = tmp_path / "out"
    out.mkdir()
    try:
        with pytest.raises(ResultsTooLarge, match="limit of 1000000 bytes"):
            await _run(
                ex,
                _spec(
                    "while true; do head -c 200000 /dev/zero >> /out/f; sleep 0.1; done",
                    timeout=600,
                ),
                "filler",
                tmp_path,
                [bind(out, "/out", read_only=False)],
            )
    finally:
        ex.close()


async def test_a_worker_started_with_a_results_limit_fails_the_job_with_the_reason(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=1, kubo_nodes=1, worker_args=["--results-limit", "100k"])
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit(
            {
                "image": "bacq-test/busybox",
                "command": ["sh", "-c", "head -c 200000 /dev/zero > /out/big"],
                "outputs": [{"name": "big", "path": "/out"}],
            }
        )
        job = await client.wait(job_id, timeout=180)
    assert job.state == JobState.FAILED
    error = job.executions["w1"].error or ""
    assert "exceed this worker's limit of 102400 bytes" in error


def test_leftover_cleanup_spares_a_namesake_workers_containers(executor: DockerExecutor) -> None:
    # two workers named w1 on one Docker daemon (two devstacks): one's restart must not remove
    # the other's running container
    client = executor._docker
    node = f"w-{uuid.uuid4().hex[:8]}"
    theirs = client.containers.create(
        BUSYBOX,
        ["sleep", "30"],
        name=_name("theirs"),
        labels={"bacq.node": node, "bacq.work_dir": "/srv/other-devstack/w1"},
    )
    mine = client.containers.create(
        BUSYBOX,
        ["sleep", "30"],
        name=_name("mine"),
        labels={"bacq.node": node, "bacq.work_dir": "/srv/this-devstack/w1"},
    )
    try:
        removed = executor.remove_leftovers(node, "/srv/this-devstack/w1")
        assert removed == [mine.name]
        theirs.reload()  # still there
    finally:
        for container in (theirs, mine):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


# Measured on the 2-core machine: the worker's peak RSS was 75 MB before and 77 MB after a job that
# streamed 256 MiB of stdout before it was killed (it used to grow by the whole output: 2.5 GB for
# 600 MB). The bounds leave room for allocator noise, not for output held in memory.
WORKER_RSS_BOUND = 160 * 1024**2
WORKER_RSS_GROWTH_BOUND = 32 * 1024**2


async def test_a_job_printing_2gb_is_killed_at_the_results_limit_and_its_worker_stays_flat(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=1, kubo_nodes=1, worker_args=["--results-limit", "256m"])
    worker = stack.services["w1"].proc
    assert worker is not None
    before = _peak_rss(worker.pid)
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job_id = await client.submit(
            {
                "image": "bacq-test/busybox",
                # 2 GiB of printable bytes (long lines: Docker's own log stays compact)
                "command": ["sh", "-c", "head -c 2147483648 /dev/zero | tr '\\000' a"],
                "timeout": 600,
            }
        )
        job = await client.wait(job_id, timeout=600)
    after = _peak_rss(worker.pid)
    assert job.state == JobState.FAILED
    error = job.executions["w1"].error or ""
    assert "stdout and stderr exceed this worker's limit of 268435456 bytes" in error, error
    assert "--results-limit" in error
    assert after < WORKER_RSS_BOUND, (before, after)
    assert after - before < WORKER_RSS_GROWTH_BOUND, (before, after)
