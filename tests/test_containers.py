"""Job containers are hardened: each limit is checked from inside a real container (real dockerd).

The machine runs cgroup v1 (dockerd's cgroupfs driver), so limits are read from the v1 files
the container sees under /sys/fs/cgroup. A results limit stops oversized output with a clear error.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker.errors
import pytest

from bacq.client import Client
from bacq.devstack import Devstack
from bacq.errors import ExecutionError, ResultsTooLarge
from bacq.spec import JobSpec, parse_spec
from bacq.states import JobState
from bacq.worker.executor import DockerExecutor, bind
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
    result = await executor.run(
        _spec(PROBE),
        name=_name("limits"),
        mounts=[bind(out, "/out", read_only=False)],
        labels={},
    )
    facts = _facts(result.stdout)
    assert result.exit_code == 0, result.stderr
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
    executor: DockerExecutor,
) -> None:
    spec = _spec("ip -o link", network=True)
    assert executor.why_not(spec) is not None
    with pytest.raises(ExecutionError, match="needs network access"):
        await executor.run(spec, name=_name("nonet"), mounts=[], labels={})


async def test_a_worker_that_allows_network_gives_it_only_to_jobs_that_ask() -> None:
    ex = DockerExecutor.from_env(allow_network=True)
    try:
        asks = await ex.run(
            _spec("ip -o link | awk -F': ' '{print $2}'", network=True),
            name=_name("net"),
            mounts=[],
            labels={},
        )
        silent = await ex.run(
            _spec("ip -o link | awk -F': ' '{print $2}'"), name=_name("net2"), mounts=[], labels={}
        )
    finally:
        ex.close()
    assert any(link.startswith("eth0") for link in asks.stdout.decode().split())
    assert silent.stdout.decode().split() == ["lo"]


async def test_results_over_the_workers_limit_fail_with_a_clear_error(tmp_path: Path) -> None:
    ex = DockerExecutor.from_env(results_limit=100_000)
    out = tmp_path / "out"
    out.mkdir()
    try:
        small = await ex.run(
            _spec("head -c 50000 /dev/zero > /out/small"),
            name=_name("small"),
            mounts=[bind(out, "/out", read_only=False)],
            labels={},
        )
        assert small.exit_code == 0
        with pytest.raises(ResultsTooLarge, match=r"exceed this worker's limit of 100000 bytes"):
            await ex.run(
                _spec("head -c 200000 /dev/zero > /out/big"),
                name=_name("big"),
                mounts=[bind(out, "/out", read_only=False)],
                labels={},
            )
        with pytest.raises(ResultsTooLarge, match="stdout and stderr"):
            await ex.run(
                _spec("head -c 200000 /dev/zero"), name=_name("bigout"), mounts=[], labels={}
            )
    finally:
        ex.close()


async def test_a_job_that_keeps_writing_is_killed_once_over_the_limit(tmp_path: Path) -> None:
    ex = DockerExecutor.from_env(results_limit=1_000_000)
    out = tmp_path / "out"
    out.mkdir()
    try:
        with pytest.raises(ResultsTooLarge, match="limit of 1000000 bytes"):
            await ex.run(
                _spec(
                    "while true; do head -c 200000 /dev/zero >> /out/f; sleep 0.1; done",
                    timeout=600,
                ),
                name=_name("filler"),
                mounts=[bind(out, "/out", read_only=False)],
                labels={"bacq.test": "filler"},
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
