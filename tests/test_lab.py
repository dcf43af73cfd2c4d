"""The lab (bacq.lab): simulated hosts in network namespaces, up from the CLI, a job from the root
namespace whose input crosses the lab over bitswap, and a ``down`` that leaves nothing behind.

Runs as root (CI does); a lab that cannot come up fails the test. Each run uses its own bridge and
subnet (``--index``) so that two test runs on one machine do not meet.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bacq.auth import NatsOptions
from bacq.client import Client
from bacq.devstack import find_ipfs
from bacq.errors import ConfigError
from bacq.lab import Lab, net
from bacq.states import JobState
from bacq.storage import Storage
from tests.scenarios import BUSYBOX

WORKERS = 3


@dataclass
class RunningLab:
    lab: Lab
    env: dict[str, str]


def _lab_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bacq.lab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _ipfs(api: str, *args: str) -> str:
    done = subprocess.run(
        [find_ipfs(), "--api", api, *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def _stat(pid: int) -> list[str]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text.rsplit(")", 1)[1].split()  # after "pid (comm)": state is [0], starttime [19]


def _started(pid: int) -> str:
    fields = _stat(pid)
    return fields[19] if fields else ""


def _running(pid: int, started: str) -> bool:
    """The same process (not a later one with its pid) is still there and not a zombie."""
    fields = _stat(pid)
    return bool(fields) and fields[19] == started and fields[0] != "Z"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[RunningLab]:
    index = 100 + os.getpid() % 150
    where = ["--index", str(index), "--state-dir", str(tmp_path / "lab")]
    up = _lab_cli("up", "--workers", str(WORKERS), "--requesters", "2", "--verifiers", "2", *where)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        env = dict(
            line.removeprefix("export ").split("=", 1) for line in up.stdout.strip().splitlines()
        )
        the_lab = Lab(
            index=index, workers=WORKERS, requesters=2, verifiers=2, state_dir=tmp_path / "lab"
        )
        yield RunningLab(the_lab, env)
    finally:
        _lab_cli("down", *where)  # the test checks what down leaves; this is the safety net


async def test_a_job_from_the_root_namespace_runs_on_lab_hosts_with_inputs_over_bitswap(
    lab: RunningLab, tmp_path: Path
) -> None:
    env, the_lab = lab.env, lab.lab
    assert env["BACQ_NATS_USER"] == "client"
    assert Path(env["BACQ_NATS_PASSWORD_FILE"]).stat().st_mode & 0o777 == 0o600
    where = ["--index", str(the_lab.index), "--state-dir", str(the_lab.state_dir)]
    status = _lab_cli("status", "--output", "json", *where)
    assert status.returncode == 0, status.stdout + status.stderr
    rows = json.loads(status.stdout)["hosts"]
    assert [r["role"] for r in rows].count("requester") == 2  # one active, one standby
    assert all(r["ok"] for r in rows), rows
    # up again: the lab runs, nothing is started twice
    again = _lab_cli(
        "up", "--workers", str(WORKERS), "--requesters", "2", "--verifiers", "2",
        "--index", str(the_lab.index), "--state-dir", str(the_lab.state_dir),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stdout == "\n".join(f"export {k}={v}" for k, v in env.items()) + "\n"

    # the input is added on the client's kubo (a host of its own), the job submitted from here
    (tmp_path / "in.txt").write_text("across the lab\n")
    storage = await Storage.connect(env["BACQ_IPFS_API"])
    try:
        cid = await storage.add(tmp_path / "in.txt")
    finally:
        await storage.close()
    options = NatsOptions.from_env("client", env)
    async with await Client.connect(env["BACQ_NATS_URL"], options=options) as client:
        job_id = await client.submit(
            {
                "image": BUSYBOX,
                "command": ["sh", "-c", "cat /data/in.txt > /out/copy.txt"],
                "inputs": [{"cid": cid, "path": "/data/in.txt"}],
                "outputs": [{"name": "result", "path": "/out"}],
                "concurrency": 2,
                "confidence": 2,
            }
        )
        job = await client.wait(job_id, timeout=240)
        # the cluster keeps three copies of what it stores (live output and nodes included)
        js = client.bus.js
        for stream in ("BACQ_LOGS", "KV_bacq-nodes", "KV_bacq-jobs"):
            assert (await js.stream_info(stream)).config.num_replicas == 3, stream
    assert job.state == JobState.ACCEPTED, job.reason
    ran = sorted(n for n, e in job.executions.items() if e.result_cid)  # the chosen two
    assert len(ran) == 2
    hosts = {h.name: h for h in the_lab.hosts()}
    for node in ran:
        # the worker's own kubo, on its own host, received the input's blocks over bitswap
        stat = _ipfs(f"/ip4/{hosts[node].address}/tcp/5001", "bitswap", "stat", "--human=false")
        received = int(stat.split("data received:")[1].split()[0])
        assert received >= len("across the lab\n"), stat

    # down: nothing of the lab is left
    processes = {
        (pid, _started(pid))
        for ns in net.namespaces(the_lab.prefix + "-")
        for pid in net.namespace_pids(ns)
    }
    assert len(processes) >= 3 + 2 + 2 + 1 + 2 * WORKERS
    down = _lab_cli("down", "--index", str(the_lab.index), "--state-dir", str(the_lab.state_dir))
    assert down.returncode == 0, down.stderr
    assert net.namespaces(the_lab.prefix + "-") == []
    assert net.host_veths(f"bl{the_lab.index}h") == []
    assert net.host_veths(the_lab.bridge) == []
    assert [pid for pid, started in processes if _running(pid, started)] == []
    work_dirs = subprocess.run(
        [
            "docker",
            "ps",
            "-a",
            "--filter",
            "label=bacq.work_dir",
            "--format",
            '{{.Label "bacq.work_dir"}}',
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    left = [d for d in work_dirs if d.startswith(str(the_lab.state_dir))]
    assert left == []
    rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    assert the_lab.bridge not in rules
    assert not the_lab.state_dir.exists()
    # and down again is fine
    assert _lab_cli("down", "--index", str(the_lab.index)).returncode == 0


def test_the_lab_needs_root_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="the lab needs root"):
        net.require_root()


def test_bad_host_counts_are_refused_with_the_flag_named() -> None:
    with pytest.raises(ConfigError, match="--requesters must be from 1 to 9"):
        Lab(requesters=0)
    with pytest.raises(ConfigError, match="--verifiers must be from 1 to 9"):
        Lab(verifiers=10)
    with pytest.raises(ConfigError, match="--workers must be from 1 to 150"):
        Lab(workers=0)


def test_the_lab_plan_uses_only_its_own_names_and_addresses() -> None:
    lab = Lab(index=7)  # the defaults: 10 workers, 2 requesters, 2 verifiers
    hosts = lab.hosts()
    assert len(hosts) == 3 + 2 + 2 + 1 + 10
    assert [h.name for h in hosts if h.role in ("requester", "verifier")] == [
        "requester-1",
        "requester-2",
        "verifier-1",
        "verifier-2",
    ]
    assert all(h.address.startswith("10.213.7.") for h in hosts)
    assert all(h.ns.startswith("bacqlab7-") for h in hosts)
    assert all(len(h.veth) <= 15 and h.veth.startswith("bl7h") for h in hosts)
    assert len({h.address for h in hosts}) == len(hosts)
    assert json.loads(json.dumps(lab.env()))["BACQ_NATS_URL"].count("nats://10.213.7.") == 3


def test_bacq_lab_names_a_bad_flag_and_reports_a_missing_lab(tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "bacq", "lab", "up", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "--workers must be from 1 to 150, not 0" in bad.stderr
    missing = _lab_cli("status", "--index", "5", "--state-dir", str(tmp_path / "none"))
    assert missing.returncode == 1
    assert f"no lab in {tmp_path / 'none'}" in missing.stdout


def test_fault_amounts_take_their_units_and_name_the_flag_when_bad() -> None:
    from bacq.lab.cli import _amount

    assert _amount("10%", "%", "--loss") == 10.0
    assert _amount("2.5", "%", "--loss") == 2.5
    assert _amount("100ms", "ms", "--delay") == 100.0
    bad = re.escape("--delay must be a number of ms, e.g. 100ms; not '1s'")
    with pytest.raises(ConfigError, match=bad):
        _amount("1s", "ms", "--delay")


def test_bad_fault_settings_are_refused_before_anything_is_touched() -> None:
    with pytest.raises(ConfigError, match="--loss must be a percentage from 0 to 100, not 150"):
        net.netem("bacqlab-none", "bl-none", 150, 0)
    with pytest.raises(ConfigError, match="netem needs --loss or --delay"):
        net.netem("bacqlab-none", "bl-none", 0, 0)
    with pytest.raises(ConfigError, match="--executor must be one of docker, noop"):
        Lab(executor="podman")


async def test_the_chaos_run_names_an_unknown_fault_kind(tmp_path: Path) -> None:
    import argparse

    from bacq.lab.chaos import chaos

    args = argparse.Namespace(jobs=1, parallel=1, rate=0, faults="cut-worker,unplug-moon")
    with pytest.raises(ConfigError, match="--faults: unknown kind 'unplug-moon'; the kinds: "):
        await chaos(Lab(state_dir=tmp_path / "none"), args)


def test_a_fault_names_the_hosts_when_the_host_is_unknown(tmp_path: Path) -> None:
    lab = Lab(index=9, workers=2, state_dir=tmp_path / "lab")
    with pytest.raises(ConfigError, match="no lab in"):
        lab.host("w1")
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "state.json").write_text(
        json.dumps({"hosts": [dataclasses.asdict(h) for h in lab.hosts()]})
    )
    with pytest.raises(ConfigError, match="the lab has no host 'w9'; its hosts: nats-1, "):
        lab.host("w9")
    with pytest.raises(ConfigError, match="host nats-1 runs nats, not 'kubo'"):
        lab._service_name(lab.host("nats-1"), "kubo")
    assert lab._service_name(lab.host("w2"), "kubo") == "w2-kubo"
    assert lab._service_name(lab.host("w2"), None) == "w2"
    assert lab._service_name(lab.host("ipfs"), None) == "ipfs-kubo"
