"""deploy/systemd: units verify cleanly, their exposure is recorded, and a real systemd runs one.

``systemd-analyze verify`` and ``security --offline=yes`` run on the host against a root made of the
units, the host's own unit tree and the real binaries at their install paths. The real run starts
systemd as PID 1 in a Debian container (image ``bacq-test/systemd:bookworm``, built once from
tests/systemd/Dockerfile) with the host's Docker socket, the venv and its Python mounted read-only,
and runs ``bacq-requester``, ``bacq-verifier`` and ``bacq-worker@NAME`` unchanged, each with its
role's NATS user, against nats-server (deploy/nats/nats-server.conf) and kubo on the host (host
network, loopback).

The worker's work dir (/var/lib/bacq/worker-NAME) is the same path on the host and in the container,
because dockerd on the host bind-mounts job folders from it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from bacq.auth import NatsOptions
from bacq.client import Client
from bacq.devstack import KuboNode, NatsServer, find_ipfs, find_nats_server
from bacq.natsconf import EXAMPLE_NODES, password_var
from bacq.states import ExecState, JobState
from bacq.storage import Storage

ROOT = Path(__file__).parent.parent
UNITS = ROOT / "deploy" / "systemd"
IMAGE = "bacq-test/systemd:bookworm"
# `systemd-analyze security --offline=yes` exposure (0 best, 10 worst) recorded in deploy/README.md;
# a change to a unit that raises one fails here until the README says why.
# the shipped auth.conf: a user per role and per example worker node (w1, w2, w3)
USERS = ("client", "requester", "verifier", *EXAMPLE_NODES)
PASSWORDS = {user: f"{user}-sd-{os.getpid()}" for user in USERS}
SERVER_ENV = {password_var(u, node=u in EXAMPLE_NODES): pw for u, pw in PASSWORDS.items()}
RECORDED_EXPOSURE = {
    "bacq-worker@w1.service": 1.5,
    "bacq-requester.service": 1.4,
    "bacq-verifier.service": 1.4,
    "nats-server.service": 1.4,
    "kubo.service": 1.6,
}


def _run(
    *argv: str, timeout: float = 120.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return done


def _place(binary: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(binary, target)
    except OSError:
        shutil.copy2(binary, target)


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root holding the units, the host's unit tree and the real binaries at their paths."""
    root = tmp_path_factory.mktemp("systemd-root")
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS.glob("*.service"):
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    _place(str(Path(sys.executable).parent / "bacq"), root / "opt/bacq/venv/bin/bacq")
    _place(find_nats_server(), root / "usr/local/bin/nats-server")
    _place(find_ipfs(), root / "usr/local/bin/ipfs")
    _place("/bin/kill", root / "bin/kill")
    return root


def test_every_unit_passes_systemd_analyze_verify(unit_root: Path) -> None:
    assert sorted(RECORDED_EXPOSURE) == sorted(
        u.name.replace("@.", "@w1.") for u in UNITS.glob("*.service")
    )
    for unit in RECORDED_EXPOSURE:
        done = _run("systemd-analyze", "verify", f"--root={unit_root}", unit, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", f"{unit}: {done.stderr}"


def test_every_unit_keeps_its_recorded_security_exposure(unit_root: Path) -> None:
    scores = {}
    for unit in RECORDED_EXPOSURE:
        done = _run("systemd-analyze", "security", "--offline=yes", f"--root={unit_root}", unit)
        match = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)
        assert match, done.stdout[-500:]
        scores[unit] = float(match.group(1))
    print("systemd-analyze security --offline=yes:", scores)
    for unit, score in scores.items():
        assert score <= RECORDED_EXPOSURE[unit], f"{unit}: {score} > {RECORDED_EXPOSURE[unit]}"


# -- a real systemd ------------------------------------------------------------------------------
def _ensure_image() -> None:
    if _run("docker", "image", "inspect", IMAGE, check=False).returncode == 0:
        return
    # built once (scripts/setup.sh does it too); apt uses the sources debootstrap wrote
    _run("docker", "build", "-t", IMAGE, str(ROOT / "tests" / "systemd"), timeout=900)


class Machine:
    """A container with systemd as PID 1; ``sh`` runs a shell script in it as root."""

    def __init__(self, name: str) -> None:
        self.name = name

    def sh(self, script: str, *, check: bool = True, timeout: float = 120.0) -> str:
        done = subprocess.run(
            ["docker", "exec", "-i", self.name, "bash", "-s"],
            input="set -euo pipefail\n" + script,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"in {self.name}: {script}\nfailed: {done.stdout}{done.stderr}")
        return done.stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture
def machine() -> Iterator[Machine]:
    _ensure_image()
    name = f"bacq-systemd-{uuid.uuid4().hex[:8]}"
    python_home = Path(sys.base_prefix)
    Path("/var/lib/bacq").mkdir(parents=True, exist_ok=True)
    _run(
        "docker", "run", "-d", "--name", name,
        # systemd as PID 1 needs to mount and make namespaces for the units' sandboxing
        "--cap-add", "SYS_ADMIN",
        "--security-opt", "seccomp=unconfined",
        "--security-opt", "apparmor=unconfined",
        "--network", "host",
        "--tmpfs", "/run", "--tmpfs", "/run/lock",
        "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro",
        "-v", "/var/run/docker.sock:/var/run/docker.sock",
        "-v", "/var/lib/bacq:/var/lib/bacq",
        "-v", f"{ROOT}:{ROOT}:ro",
        # the same again at fixed paths outside /tmp and /home, which the units hide
        # (PrivateTmp, ProtectHome): a clone under /tmp must work too
        "-v", f"{ROOT}:/opt/bacq/src:ro",
        "-v", f"{sysconfig.get_paths()['purelib']}:/opt/bacq/site:ro",
        "-v", f"{python_home}:/opt/python:ro",
        "-v", f"{find_nats_server()}:/usr/local/bin/nats-server:ro",
        "-v", f"{find_ipfs()}:/usr/local/bin/ipfs:ro",
        IMAGE,
    )  # fmt: skip
    m = Machine(name)
    try:
        m.sh(  # systemd's bus comes up first, then --wait blocks until start-up is over
            "for i in $(seq 100); do s=$(systemctl is-system-running --wait 2>/dev/null) && break;"
            ' [ "$s" = degraded ] && break; sleep 0.2; done'
        )
        _install(m)
        yield m
    finally:
        _run("docker", "rm", "-f", name, check=False)


def _install(m: Machine) -> None:
    """What deploy/README.md tells an operator to do, with the host's bacq as the package."""
    docker_gid = os.stat("/var/run/docker.sock").st_gid
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    libpython = f"/opt/python/lib/lib{version}.so.1.0"
    m.sh(
        f"""
        groupadd -g {docker_gid} docker 2>/dev/null || true
        systemd-sysusers {UNITS}/bacq.sysusers.conf
        # the host's Python is built with an absolute RUNPATH under /root, which ProtectHome hides
        if [ -f {libpython} ]; then cp {libpython} /usr/local/lib/ && ldconfig; fi
        /opt/python/bin/{version} -m venv --without-pip /opt/bacq/venv
        # bacq from the checkout, its dependencies from the host's venv (not its .pth files: the
        # editable install's finder points at the host path)
        echo 'import sys; sys.path.insert(0, "/opt/bacq/src"); sys.path.append("/opt/bacq/site")' \
            > /opt/bacq/venv/lib/{version}/site-packages/bacq-host.pth
        printf '#!/opt/bacq/venv/bin/python3\\nimport sys\\nfrom bacq.cli import main\\n'\\
'sys.exit(main())\\n' > /opt/bacq/venv/bin/bacq
        chmod 755 /opt/bacq/venv/bin/bacq
        mkdir -p /etc/bacq
        cp {UNITS}/bacq-worker@.service {UNITS}/bacq-requester.service \
           {UNITS}/bacq-verifier.service /etc/systemd/system/
        systemctl daemon-reload
        """
    )


async def _wait_exec_state(client: Client, job_id: str, node: str, state: ExecState) -> None:
    for _ in range(600):
        job = await client.job(job_id)
        execution = job.executions.get(node)
        if execution is not None and execution.state == state:
            return
        if job.final:
            raise AssertionError(f"job ended {job.state} before {node} was {state}: {job.reason}")
        await asyncio.sleep(0.2)
    raise AssertionError(f"{node} never reached {state}")


async def _wait_status(m: Machine, unit: str, text: str) -> str:
    status = ""
    for _ in range(300):  # STATUS is refreshed every few seconds from the event loop
        status = m.show(unit, "StatusText")["StatusText"]
        if status == text:
            return status
        await asyncio.sleep(0.2)
    raise AssertionError(f"{unit} status stayed {status!r}, expected {text!r}")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[NatsServer, KuboNode]]:
    """nats-server with deploy/nats/nats-server.conf (users per role) and kubo, on the host."""
    nats_server = NatsServer(
        tmp_path / "nats",
        tmp_path / "nats.log",
        args=["-c", str(ROOT / "deploy" / "nats" / "nats-server.conf")],
        env=SERVER_ENV,
    )
    kubo = KuboNode(tmp_path / "kubo", tmp_path / "kubo.log")
    try:
        nats_server.start()
        kubo.start()
        yield nats_server, kubo
    finally:
        kubo.stop()
        nats_server.stop()


def _credentials(role: str) -> str:
    return f"BACQ_NATS_USER={role}\\nBACQ_NATS_PASSWORD={PASSWORDS[role]}\\n"


async def test_units_under_real_systemd_report_ready_run_a_job_and_stop_cleanly(
    machine: Machine, servers: tuple[NatsServer, KuboNode], tmp_path: Path
) -> None:
    nats_server, kubo = servers
    node = "w1"  # a node of the shipped auth.conf, with its own user
    unit = f"bacq-worker@{node}.service"
    machine.sh(
        f"""
        printf 'BACQ_NATS_URL={nats_server.url}\\nBACQ_IPFS_API={kubo.api}\\n' > /etc/bacq/bacq.env
        printf '{_credentials("requester")}' > /etc/bacq/requester.env
        printf '{_credentials("verifier")}' > /etc/bacq/verifier.env
        printf '{_credentials(node)}BACQ_WORKER_ARGS=--cpu 1 --memory 1g --max-jobs 2\\n' \\
            > /etc/bacq/worker-{node}.env
        chmod 0640 /etc/bacq/*.env && chgrp bacq /etc/bacq/*.env
        """
    )
    os.environ.update({"BACQ_NATS_USER": "client", "BACQ_NATS_PASSWORD": PASSWORDS["client"]})
    try:
        # Type=notify: `systemctl start` returns once each service sent READY=1
        machine.sh("systemctl start bacq-requester bacq-verifier", timeout=120)
        for service in ("bacq-requester.service", "bacq-verifier.service"):
            assert machine.show(service, "ActiveState", "StatusText") == {
                "ActiveState": "active",
                "StatusText": "serving",
            }
        machine.sh(f"systemctl start {unit}", timeout=120)
        state = machine.show(unit, "ActiveState", "SubState", "Type", "WatchdogUSec", "User")
        assert state == {
            "ActiveState": "active",
            "SubState": "running",
            "Type": "notify",
            "WatchdogUSec": "30s",
            "User": "bacq",
        }
        journal = machine.sh(f"journalctl -u {unit} --no-pager -o cat")
        # Type=notify: "active" means READY=1 arrived; it is sent on the service.ready line (logged
        # once subscribed). The journal does not order the service's stdout against systemd's own
        # "Started" line reliably, so only the line's presence is checked here.
        assert '"service.ready"' in journal
        await _wait_status(machine, unit, "running 0 jobs, 0 done")
        # watchdog pings come from the event loop: systemd's timestamp of the last one moves on
        first = machine.show(unit, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
        for _ in range(300):
            now = machine.show(unit, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
            if now != first:
                break
            await asyncio.sleep(0.2)
        assert now != first, "no watchdog ping reached systemd"

        storage = await Storage.connect(kubo.api)
        client = await Client.connect(nats_server.url)
        try:
            source = tmp_path / "in.txt"
            source.write_text("hello from the host\n")
            cid = await storage.add(source)
            job_id = await client.submit(
                {
                    "image": "bacq-test/busybox",
                    "command": ["sh", "-c", "cat /in.txt > /out/copy.txt; id -u"],
                    "inputs": [{"cid": cid, "path": "/in.txt"}],
                    "outputs": [{"name": "result", "path": "/out"}],
                }
            )
            job = await client.wait(job_id, timeout=180)
            assert job.state == JobState.ACCEPTED, job.reason
            assert job.executions[node].state == ExecState.VERIFIED
            results = await client.fetch_results(storage, job, tmp_path / "results")
            assert (results / "result" / "copy.txt").read_text() == "hello from the host\n"
            bacq_uid = machine.sh("id -u bacq").strip()
            assert (results / "stdout").read_text().strip() == bacq_uid  # not root in the job
            await _wait_status(machine, unit, "running 0 jobs, 1 done")

            # a job runs; `systemctl stop` sends SIGTERM: the worker stops bidding, lets the job
            # finish (--drain-timeout), reports it and exits cleanly well within TimeoutStopSec
            long_id = await client.submit(
                {"image": "bacq-test/busybox", "command": ["sh", "-c", "sleep 5; echo done"]}
            )
            await _wait_exec_state(client, long_id, node, ExecState.RUNNING)
            await _wait_status(machine, unit, "running 1 jobs, 1 done")
            machine.sh(f"systemctl stop {unit}", timeout=900)
            stopped = machine.show(unit, "ActiveState", "Result", "ExecMainStatus")
            assert stopped == {
                "ActiveState": "inactive",
                "Result": "success",
                "ExecMainStatus": "0",
            }
            journal = machine.sh(f"journalctl -u {unit} --no-pager -o cat")
            assert '"service.stopped"' in journal
            long_job = await client.wait(long_id, timeout=300)
            assert long_job.final
            # drained: the job finished (and was verified) before the worker left
            assert long_job.executions[node].state == ExecState.VERIFIED, long_job.reason
            leftovers = _run(
                "docker",
                "ps",
                "-aq",
                "--filter",
                f"label=bacq.node={node}",
                "--filter",
                f"label=bacq.work_dir=/var/lib/bacq/worker-{node}",
            )
            assert leftovers.stdout.strip() == ""
        finally:
            await client.close()
            await storage.close()
    finally:
        for key in ("BACQ_NATS_USER", "BACQ_NATS_PASSWORD"):
            os.environ.pop(key, None)
        machine.sh(f"systemctl stop {unit} bacq-requester bacq-verifier || true", check=False)
        shutil.rmtree(f"/var/lib/bacq/worker-{node}", ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_the_nats_server_and_kubo_example_units_run_under_real_systemd(
    machine: Machine,
) -> None:
    port = _free_port()
    passwords = "".join(f"{var}={pw}\\n" for var, pw in SERVER_ENV.items())
    machine.sh(
        f"""
        install -d -m 0750 -o nats -g nats /etc/nats
        cp {ROOT}/deploy/nats/nats-server.conf {ROOT}/deploy/nats/auth.conf /etc/nats/
        # the operator's one edit: where to listen (a free loopback port on this shared machine)
        sed -i 's/^listen: .*/listen: 127.0.0.1:{port}/' /etc/nats/nats-server.conf
        printf '{passwords}' > /etc/nats/bacq.env && chmod 0600 /etc/nats/bacq.env
        install -d -o kubo -g kubo /var/lib/kubo
        runuser -u kubo -- env IPFS_PATH=/var/lib/kubo ipfs init --profile test >/dev/null
        runuser -u kubo -- env IPFS_PATH=/var/lib/kubo ipfs config Routing.Type none
        cp {UNITS}/nats-server.service {UNITS}/kubo.service /etc/systemd/system/
        systemctl daemon-reload
        """
    )
    try:
        # kubo is Type=notify: start returns once the daemon said READY=1
        machine.sh("systemctl start nats-server kubo", timeout=180)
        for unit in ("nats-server.service", "kubo.service"):
            assert machine.show(unit, "ActiveState", "SubState", "User") == {
                "ActiveState": "active",
                "SubState": "running",
                "User": unit.split("-")[0].split(".")[0],
            }
        peer = machine.sh(
            "IPFS_PATH=/var/lib/kubo ipfs --api $(cat /var/lib/kubo/api) id -f '<id>'"
        )
        assert peer.startswith("12D3")
        # nats-server runs the users of auth.conf with JetStream in its state directory
        options = NatsOptions(role="requester", user="requester", password=PASSWORDS["requester"])
        nc = await nats.connect(f"nats://127.0.0.1:{port}", **options.connect_kwargs())
        try:
            info = await nc.jetstream(timeout=10).account_info()
            assert info.limits is not None
        finally:
            await nc.close()
        anonymous = subprocess.run(
            [sys.executable, "-m", "bacq", "list", "--nats", f"nats://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("BACQ_NATS_")},
            check=False,
        )
        assert anonymous.returncode == 1
        assert "authorization violation" in anonymous.stderr
        machine.sh("test -d /var/lib/nats/jetstream")
        machine.sh("systemctl stop nats-server kubo", timeout=120)
        for unit in ("nats-server.service", "kubo.service"):
            assert machine.show(unit, "ActiveState")["ActiveState"] == "inactive"
    finally:
        machine.sh("systemctl stop nats-server kubo || true", check=False)
