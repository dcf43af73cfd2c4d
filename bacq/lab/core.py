"""The lab's hosts and their processes: bring them up, report on them, take them all down.

Touches the lab's network namespaces and bridge (through ``bacq.lab.net``), its state directory
(kubo repos, NATS stores, configs, credentials, logs, ``state.json``), the processes it starts
inside its namespaces, and the Docker containers its workers started (label ``bacq.work_dir`` under
the state directory). Each host is a namespace with one address:

    10.213.<i>.1         the bridge, in the root namespace (where the CLI runs)
    10.213.<i>.11-13     nats-1..3: a NATS cluster with JetStream (streams and buckets R3)
    10.213.<i>.21-29     requester-1..   (two by default: one active, the other its standby)
    10.213.<i>.31-39     verifier-1..    (likewise)
    10.213.<i>.40        ipfs: the client's kubo node (BACQ_IPFS_API)
    10.213.<i>.101-      w1..wN: a kubo node and a worker each

Every kubo node's bootstrap list holds the lab's other kubo nodes and nothing else (no public
peers, no delegated routing), so inputs added on the client's node reach the workers over bitswap.
Workers reach dockerd through its socket; job containers keep network none. Every process has its
own NATS user (``bacq.natsconf.render`` with one user per worker; passwords in 0600 files).

Faults (``cut``, ``heal``, ``netem``, ``kill``, ``start``): a host cut off from the bridge, a
worker's kubo cut off from the swarm, loss and latency, a service killed (``kill -9``) and started
again with the command line ``up`` recorded for it (``services.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bacq.devstack import find_ipfs, find_nats_server, remove_containers, write_secret
from bacq.errors import ComponentError, ConfigError
from bacq.lab import net
from bacq.log import get_logger
from bacq.natsconf import render
from bacq.sdnotify import READY_FILE_ENV

__all__ = ["DEFAULT_STATE_DIR", "Host", "Lab"]

log = get_logger("bacq.lab")
DEFAULT_STATE_DIR = Path(os.environ.get("BACQ_LAB_DIR", "/var/lib/bacq-lab"))
NATS_PORT, ROUTE_PORT, KUBO_SWARM, KUBO_API = 4222, 6222, 4001, 5001
MAX_WORKERS = 150  # addresses .101 to .250
START_WAIT = 180.0  # seconds a host has to come up (2 shared cores, ten of everything)
EXECUTORS = ("docker", "noop")
# the services a host runs (the first is the one ``kill HOST`` means), by role
SERVICES = {
    "nats": ("nats",),
    "requester": ("requester",),
    "verifier": ("verifier",),
    "ipfs": ("kubo",),
    "worker": ("worker", "kubo"),
}
CUT_ONLY = {"ipfs": [KUBO_SWARM]}  # `cut HOST --only ipfs`: its kubo's swarm port only


@dataclass(frozen=True)
class Host:
    """One simulated host: a namespace with one address on the lab's bridge."""

    name: str  # nats-1, requester-1, verifier-1, ipfs, w1, …
    role: str  # nats, requester, verifier, ipfs, worker
    ns: str
    veth: str
    address: str


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait(predicate: Callable[[], bool], timeout: float, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    tail = ""
    if log_path.exists():
        tail = "; last log lines:\n" + "\n".join(
            log_path.read_text(errors="replace").splitlines()[-15:]
        )
    raise ComponentError(f"{what} did not come up within {timeout:g}s{tail}")


class Lab:
    """``up()`` / ``status()`` / ``down()``; the lab outlives this object (state in a directory)."""

    def __init__(
        self,
        *,
        index: int = 0,
        workers: int = 10,
        requesters: int = 2,
        verifiers: int = 2,
        state_dir: Path | None = None,
        executor: str = "docker",
        fetch_timeout: float = 60.0,
    ) -> None:
        if not 0 <= index <= 254:
            raise ConfigError(
                f"--index must be from 0 to 254 (subnet 10.213.<index>.0/24), not {index}"
            )
        if not 1 <= workers <= MAX_WORKERS:
            raise ConfigError(f"--workers must be from 1 to {MAX_WORKERS}, not {workers}")
        for what, count in (("requesters", requesters), ("verifiers", verifiers)):
            if not 1 <= count <= 9:  # beyond the first, standbys that wait for the role's lease
                raise ConfigError(f"--{what} must be from 1 to 9, not {count}")
        if executor not in EXECUTORS:
            raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, not {executor!r}")
        if not 1 <= fetch_timeout <= 3600:
            raise ConfigError(f"--fetch-timeout must be from 1 to 3600 s, not {fetch_timeout:g}")
        self.executor = executor
        self.fetch_timeout = fetch_timeout
        self.index = index
        self.n_workers = workers
        self.n_requesters = requesters
        self.n_verifiers = verifiers
        self.prefix = f"bacqlab{index}"
        self.bridge = self.prefix
        self.subnet = f"{net.SUBNET}.{index}"
        self.state_dir = Path(state_dir or DEFAULT_STATE_DIR / self.prefix)
        self.logs = self.state_dir / "logs"
        self.credentials = self.state_dir / "credentials"
        self._procs: list[subprocess.Popen[bytes]] = []  # kept so that none is reaped early
        self._services: dict[str, dict[str, Any]] = {}  # what _spawn started: argv, env, host

    # -- the plan -----------------------------------------------------------------------------
    def _host(self, name: str, role: str, last_octet: int) -> Host:
        return Host(
            name=name,
            role=role,
            ns=f"{self.prefix}-{name}",
            veth=f"bl{self.index}h{last_octet}",
            address=f"{self.subnet}.{last_octet}",
        )

    def hosts(self) -> list[Host]:
        hosts = [self._host(f"nats-{i}", "nats", 10 + i) for i in (1, 2, 3)]
        hosts += [
            self._host(f"requester-{i}", "requester", 20 + i)
            for i in range(1, self.n_requesters + 1)
        ]
        hosts += [
            self._host(f"verifier-{i}", "verifier", 30 + i) for i in range(1, self.n_verifiers + 1)
        ]
        hosts.append(self._host("ipfs", "ipfs", 40))
        hosts += [self._host(f"w{i}", "worker", 100 + i) for i in range(1, self.n_workers + 1)]
        return hosts

    def _by_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts() if h.role == role]

    @property
    def nats_url(self) -> str:
        return ",".join(f"nats://{h.address}:{NATS_PORT}" for h in self._by_role("nats"))

    @property
    def ipfs_api(self) -> str:
        return f"/ip4/{self.subnet}.40/tcp/{KUBO_API}"

    def password_file(self, user: str) -> Path:
        return self.credentials / f"{user}.password"

    def env(self) -> dict[str, str]:
        """What a client in the root namespace needs (the lines ``up`` prints)."""
        return {
            "BACQ_NATS_URL": self.nats_url,
            "BACQ_IPFS_API": self.ipfs_api,
            "BACQ_NATS_USER": "client",
            "BACQ_NATS_PASSWORD_FILE": str(self.password_file("client")),
        }

    def env_lines(self) -> str:
        return "\n".join(f"export {k}={v}" for k, v in self.env().items())

    # -- up -----------------------------------------------------------------------------------
    def up(self) -> dict[str, str]:
        """Bring the lab up and return once every host is ready; nothing to do when it runs."""
        net.require_root()
        if (self.state_dir / "state.json").exists():
            report = self.status()
            if report["ok"]:
                return self.env()
            log.info("lab.restart", reason="a previous lab is incomplete; removing it first")
            self.down()
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self.env()

    def _up(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        hosts = self.hosts()
        (self.state_dir / "state.json").write_text(
            json.dumps(
                {
                    "index": self.index,
                    "workers": self.n_workers,
                    "requesters": self.n_requesters,
                    "verifiers": self.n_verifiers,
                    "executor": self.executor,
                    "fetch_timeout": self.fetch_timeout,
                    "bridge": self.bridge,
                    "hosts": [asdict(h) for h in hosts],
                    "env": self.env(),
                },
                indent=2,
            )
            + "\n"
        )
        net.bridge_up(self.bridge, f"{self.subnet}.1")
        net.firewall_allow(self.bridge)
        for host in hosts:
            net.namespace_up(host.ns, host.veth, self.bridge, host.address)
        passwords = self._passwords()
        self._start_nats(passwords)
        kubos = self._by_role("ipfs") + self._by_role("worker")
        self._start_kubos(kubos)
        self._wait_for_jetstream(passwords["requester"])
        requesters, verifiers = self._by_role("requester"), self._by_role("verifier")
        # the first of each declares the streams and buckets (three copies each) and takes the
        # role's lease; standbys and workers come once that is done
        self._start_services([(requesters[0], ["requester"]), (verifiers[0], ["verifier"])])
        self._start_services(
            [(h, ["requester"]) for h in requesters[1:]]
            + [(h, ["verifier"]) for h in verifiers[1:]]
        )
        self._start_services(
            [
                (
                    h,
                    [
                        "worker",
                        "--ipfs",
                        f"/ip4/{h.address}/tcp/{KUBO_API}",
                        "--node-id",
                        h.name,
                        "--work-dir",
                        str(self.state_dir / h.name / "work"),
                        "--executor",
                        self.executor,
                        "--fetch-timeout",
                        f"{self.fetch_timeout:g}",
                    ],
                )
                for h in self._by_role("worker")
            ]
        )

    def _passwords(self) -> dict[str, str]:
        users = ["client", "requester", "verifier"] + [h.name for h in self._by_role("worker")]
        passwords = {}
        for user in users:
            passwords[user] = secrets.token_urlsafe(24)
            write_secret(self.password_file(user), passwords[user] + "\n")
        return passwords

    def _spawn(
        self, host: Host, argv: list[str], name: str, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``host``'s namespace as service ``name`` (its log, its pid file),
        and record how, so that ``start`` can do it again after a ``kill``."""
        self._services[name] = {"host": host.name, "argv": argv, "env": env}
        services = self.state_dir / "services.json"
        recorded = json.loads(services.read_text()) if services.exists() else {}
        write_secret(services, json.dumps({**recorded, **self._services}, indent=2) + "\n")
        with (self.logs / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host.ns, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env},
                start_new_session=True,  # outlives `bacq lab up`; `down` ends it by namespace
            )
        self._procs.append(proc)
        run = self.state_dir / "run"
        run.mkdir(parents=True, exist_ok=True)
        (run / f"{name}.pid").write_text(f"{proc.pid}\n")
        return proc

    def _start_nats(self, passwords: dict[str, str]) -> None:
        servers = self._by_role("nats")
        workers = [h.name for h in self._by_role("worker")]
        variables = "\n".join(
            f"BACQ_{'WORKER_' if user in workers else ''}{user.upper()}_PASSWORD: "
            f"{json.dumps(password)}"
            for user, password in passwords.items()
        )
        routes = ", ".join(f'"nats://{h.address}:{ROUTE_PORT}"' for h in servers)
        for host in servers:
            store = self.state_dir / host.name / "jetstream"
            store.mkdir(parents=True, exist_ok=True)
            config = self.state_dir / host.name / "nats-server.conf"
            write_secret(
                config,
                f"# bacq lab: {host.name}, one of three clustered servers (written by bacq.lab)\n"
                f'server_name: "{host.name}"\n'
                f'listen: "{host.address}:{NATS_PORT}"\n'
                f"cluster {{\n  name: bacq-lab\n"
                f'  listen: "{host.address}:{ROUTE_PORT}"\n  routes: [{routes}]\n}}\n'
                f'jetstream {{\n  store_dir: "{store}"\n}}\n'
                f"max_payload: 1MB\n\n{variables}\n\n{render(workers)}",
            )
            self._spawn(host, [find_nats_server(), "-c", str(config)], host.name, {})
        for host in servers:
            log_path = self.logs / f"{host.name}.log"
            _wait(
                lambda p=log_path: b"Server is ready" in p.read_bytes(),  # type: ignore[misc]
                START_WAIT,
                host.name,
                log_path,
            )

    def _wait_for_jetstream(self, password: str) -> None:
        """The cluster elected its JetStream meta leader: the requester may declare streams."""
        import nats
        import nats.errors

        from bacq.auth import NatsOptions

        async def check() -> None:
            options = NatsOptions(role="requester", user="requester", password=password)
            nc = await nats.connect(self.nats_url.split(","), **options.connect_kwargs())
            try:
                deadline = time.monotonic() + START_WAIT
                while True:
                    try:
                        await nc.jetstream(timeout=2).account_info()
                        return
                    except (nats.errors.Error, TimeoutError):
                        if time.monotonic() > deadline:
                            raise ComponentError(
                                f"the lab's NATS cluster elected no JetStream leader in "
                                f"{START_WAIT:g}s; see {self.logs}/nats-*.log"
                            ) from None
                        await asyncio.sleep(0.2)
            finally:
                await nc.close()

        asyncio.run(check())

    def _kubo_config(self, repo: Path, host: Host, bootstrap: list[str]) -> None:
        path = repo / "config"
        config: dict[str, Any] = json.loads(path.read_text())
        config["Addresses"]["API"] = f"/ip4/{host.address}/tcp/{KUBO_API}"
        config["Addresses"]["Gateway"] = "/ip4/127.0.0.1/tcp/0"  # the namespace's own loopback
        config["Addresses"]["Swarm"] = [f"/ip4/{host.address}/tcp/{KUBO_SWARM}"]
        config["Addresses"]["Announce"] = [f"/ip4/{host.address}/tcp/{KUBO_SWARM}"]
        config["Bootstrap"] = bootstrap
        config["Routing"] = {**config.get("Routing", {}), "Type": "none"}
        config["Discovery"] = {"MDNS": {"Enabled": False}}
        config["AutoNAT"] = {"ServiceMode": "disabled"}
        swarm = config.setdefault("Swarm", {})
        swarm["RelayClient"] = {"Enabled": False}
        swarm["RelayService"] = {"Enabled": False}
        swarm["DisableNatPortMap"] = True
        swarm["Transports"] = {
            "Network": {
                "Websocket": False,
                "QUIC": False,
                "WebTransport": False,
                "WebRTCDirect": False,
            }
        }
        path.write_text(json.dumps(config, indent=2))

    def _start_kubos(self, hosts: list[Host]) -> None:
        ipfs = find_ipfs()
        ids: dict[str, str] = {}
        for host in hosts:
            repo = self.state_dir / host.name / "kubo"
            if not (repo / "config").exists():
                repo.mkdir(parents=True, exist_ok=True)
                done = subprocess.run(
                    [ipfs, "init", "--profile", "test", "--empty-repo"],
                    env={**os.environ, "IPFS_PATH": str(repo)},
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
                if done.returncode != 0:
                    raise ComponentError(f"ipfs init in {repo} failed: {done.stderr.decode()}")
            ids[host.name] = json.loads((repo / "config").read_text())["Identity"]["PeerID"]
        for host in hosts:
            repo = self.state_dir / host.name / "kubo"
            bootstrap = [
                f"/ip4/{other.address}/tcp/{KUBO_SWARM}/p2p/{ids[other.name]}"
                for other in hosts
                if other is not host
            ]
            self._kubo_config(repo, host, bootstrap)
            self._spawn(
                host,
                [ipfs, "daemon", "--migrate=false"],
                f"{host.name}-kubo",
                {"IPFS_PATH": str(repo)},
            )
        for host in hosts:
            log_path = self.logs / f"{host.name}-kubo.log"
            _wait(
                lambda p=log_path: b"Daemon is ready" in p.read_bytes(),  # type: ignore[misc]
                START_WAIT,
                f"kubo on {host.name}",
                log_path,
            )

    def _start_services(self, services: list[tuple[Host, list[str]]]) -> None:
        ready: list[tuple[Host, Path, subprocess.Popen[bytes]]] = []
        for host, args in services:
            user = host.name if host.role == "worker" else host.role
            ready_file = self.state_dir / "run" / f"{host.name}.ready"
            ready_file.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                ready_file.unlink()
            env = {
                "BACQ_NATS_USER": user,
                "BACQ_NATS_PASSWORD_FILE": str(self.password_file(user)),
                "BACQ_LOG_JSON": "1",
                "PYTHONUNBUFFERED": "1",
                "BACQ_DEBUG": "1",  # a service that dies leaves its traceback in its log
                READY_FILE_ENV: str(ready_file),
            }
            if host.role in ("requester", "verifier"):
                env["BACQ_JS_REPLICAS"] = "3"
            argv = [sys.executable, "-m", "bacq", args[0], "--nats", self.nats_url, *args[1:]]
            ready.append((host, ready_file, self._spawn(host, argv, host.name, env)))
        for host, ready_file, proc in ready:
            log_path = self.logs / f"{host.name}.log"

            def up(
                ready_file: Path = ready_file,
                proc: subprocess.Popen[bytes] = proc,
                name: str = host.name,
                log_path: Path = log_path,
            ) -> bool:
                if proc.poll() is not None:
                    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                    raise ComponentError(
                        f"{name} exited with {proc.returncode}; see {log_path}:\n{tail}"
                    )
                return ready_file.exists()

            _wait(up, START_WAIT, host.name, log_path)

    # -- faults -------------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        """The running lab's host called ``name`` (ConfigError naming the hosts when none is)."""
        state = self._state()
        if state is None:
            raise ConfigError(f"no lab in {self.state_dir}; start one with `bacq lab up`")
        hosts = {raw["name"]: Host(**raw) for raw in state["hosts"]}
        if name not in hosts:
            raise ConfigError(f"the lab has no host {name!r}; its hosts: {', '.join(hosts)}")
        return hosts[name]

    def cut(self, name: str, only: str | None = None) -> None:
        """Cut host ``name`` off: its veth on the bridge down (nothing crosses; it keeps its own
        loopback), or with ``only="ipfs"`` its kubo's swarm traffic only."""
        net.require_root()
        host = self.host(name)
        if only is None:
            net.set_link(host.veth, False)
        elif only in CUT_ONLY:
            if host.role not in ("worker", "ipfs"):
                raise ConfigError(f"--only ipfs needs a host with a kubo node, not {name}")
            net.cut_ports(host.ns, CUT_ONLY[only], True)
        else:
            raise ConfigError(f"--only must be one of {', '.join(CUT_ONLY)}, not {only!r}")
        log.info("lab.cut", host=name, only=only or "all")

    def heal(self, name: str) -> None:
        """Undo ``cut`` and ``netem`` on host ``name``."""
        net.require_root()
        host = self.host(name)
        net.set_link(host.veth, True)
        for ports in CUT_ONLY.values():
            net.cut_ports(host.ns, ports, False)
        net.netem_clear(host.ns, host.veth)
        log.info("lab.heal", host=name)

    def netem(self, name: str, *, loss: float = 0.0, delay_ms: float = 0.0) -> str:
        """Loss (percent) and latency (ms, each way) on host ``name``; returns how (see
        ``bacq.lab.net.netem``)."""
        net.require_root()
        host = self.host(name)
        how = net.netem(host.ns, host.veth, loss, delay_ms)
        log.info("lab.netem", host=name, loss=loss, delay_ms=delay_ms, how=how)
        return how

    def _service_name(self, host: Host, service: str | None) -> str:
        offered = SERVICES[host.role]
        service = service or offered[0]
        if service not in offered:
            raise ConfigError(f"host {host.name} runs {', '.join(offered)}, not {service!r}")
        return f"{host.name}-kubo" if service == "kubo" else host.name

    def pid(self, name: str, service: str | None = None) -> int | None:
        """The pid of a host's service (default: its main one) when it runs, else None."""
        host = self.host(name)
        pid_file = self.state_dir / "run" / f"{self._service_name(host, service)}.pid"
        if not pid_file.exists():
            return None
        pid = int(pid_file.read_text())
        if pid not in net.namespace_pids(host.ns):
            return None
        for proc in self._procs:  # one of ours that died: reap it, it is no longer running
            if proc.pid == pid and proc.poll() is not None:
                return None
        return pid if _alive(pid) else None

    def kill(self, name: str, service: str | None = None) -> int | None:
        """``kill -9`` a host's service (default: its main one); its pid, or None if it was not
        running. ``start`` brings it back."""
        net.require_root()
        pid = self.pid(name, service)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.pid(name, service) == pid and time.monotonic() < deadline:
                time.sleep(0.05)
        log.info("lab.kill", host=name, service=service or "main", pid=pid)
        return pid

    def start(self, name: str, service: str | None = None) -> int:
        """Start a host's service again as ``up`` did (same command line, same environment)
        and wait until it is ready; its pid. A service that runs is left alone."""
        net.require_root()
        host = self.host(name)
        running = self.pid(name, service)
        if running is not None:
            return running
        service_name = self._service_name(host, service)
        recorded = json.loads((self.state_dir / "services.json").read_text())[service_name]
        log_path = self.logs / f"{service_name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        ready_file = self.state_dir / "run" / f"{service_name}.ready"
        with contextlib.suppress(FileNotFoundError):
            ready_file.unlink()
        proc = self._spawn(host, recorded["argv"], service_name, recorded["env"])

        def ready() -> bool:
            if proc.poll() is not None:
                raise ComponentError(
                    f"{service_name} exited with {proc.returncode}; see {log_path}"
                )
            if service_name.endswith("-kubo") or host.role == "nats":
                word = b"Daemon is ready" if service_name.endswith("-kubo") else b"Server is ready"
                with log_path.open("rb") as f:
                    f.seek(offset)
                    return word in f.read()
            return ready_file.exists()

        _wait(ready, START_WAIT, service_name, log_path)
        log.info("lab.start", host=name, service=service_name, pid=proc.pid)
        return proc.pid

    # -- status -------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any] | None:
        path = self.state_dir / "state.json"
        if not path.exists():
            return None
        state: dict[str, Any] = json.loads(path.read_text())
        return state

    def status(self) -> dict[str, Any]:
        """Each host: its namespace, its processes, whether its service said it was ready."""
        state = self._state()
        if state is None:
            return {"ok": False, "up": False, "hosts": [], "state_dir": str(self.state_dir)}
        existing = set(net.namespaces(self.prefix + "-"))
        rows = []
        for raw in state["hosts"]:
            host = Host(**raw)
            pids = net.namespace_pids(host.ns) if host.ns in existing else []
            want = {"nats": 1, "ipfs": 1, "worker": 2}.get(host.role, 1)
            ready_file = self.state_dir / "run" / f"{host.name}.ready"
            service_ready = host.role in ("nats", "ipfs") or (
                ready_file.exists()
                and ready_file.read_text().strip().isdigit()
                and int(ready_file.read_text()) in pids
            )
            alive = host.ns in existing and net.link_up(host.veth)
            faults = []
            if host.ns in existing:
                if not net.link_up(host.veth):
                    faults.append("cut")
                faults += [f"port {p} cut" for p in net.dropped_ports(host.ns)]
                if shown := net.netem_show(host.ns, host.veth):
                    faults.append(shown)
            rows.append(
                {
                    "host": host.name,
                    "role": host.role,
                    "address": host.address,
                    "namespace": host.ns in existing,
                    "processes": len(pids),
                    "cut": not alive,
                    "faults": faults,
                    "ok": host.ns in existing and len(pids) >= want and service_ready,
                }
            )
        return {
            "ok": all(r["ok"] for r in rows),
            "up": True,
            "hosts": rows,
            "env": state.get("env", {}),
            "state_dir": str(self.state_dir),
        }

    # -- down ---------------------------------------------------------------------------------
    def down(self) -> dict[str, list[str]]:
        """Remove every namespace, link, process, container, rule and directory of this lab."""
        net.require_root()
        removed: dict[str, list[str]] = {"namespaces": [], "processes": [], "containers": []}
        lab_namespaces = net.namespaces(self.prefix + "-")
        # workers first: they stop their containers; then the rest
        lab_namespaces.sort(key=lambda ns: not ns.startswith(f"{self.prefix}-w"))
        for ns in lab_namespaces:
            removed["processes"] += [str(p) for p in net.kill_namespace(ns)]
        work_dirs = [p / "work" for p in self.state_dir.glob("w*") if p.is_dir()]
        removed["containers"] = remove_containers(work_dirs)
        for ns in lab_namespaces:
            net.namespace_down(ns)
            removed["namespaces"].append(ns)
        for veth in net.host_veths(f"bl{self.index}h"):
            with contextlib.suppress(ComponentError):
                net.bridge_down(veth)  # a veth whose namespace went first: `ip link del` it
        net.firewall_remove(self.bridge)
        net.bridge_down(self.bridge)
        for proc in self._procs:  # reap the ones this object started
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if self.state_dir.exists():
            raise ComponentError(f"could not remove the lab's directory {self.state_dir}")
        return removed
