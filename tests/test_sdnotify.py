"""The services speak systemd's notify protocol: READY once subscribed, STATUS, WATCHDOG, STOPPING.

Here the test plays systemd's side of the protocol: it binds the datagram socket that
``$NOTIFY_SOCKET`` names and reads what a real ``bacq verifier`` (against a real nats-server)
sends. tests/test_systemd.py runs a worker under a real systemd.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bacq.devstack import NatsServer
from bacq.sdnotify import Notifier, watchdog_interval


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", tmp_path / "nats.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    try:
        yield sock, path
    finally:
        sock.close()


def _read(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def _until(sock: socket.socket, key: str) -> dict[str, str]:
    while True:
        message = _read(sock)
        if key in message:
            return message


def test_a_service_notifies_ready_status_watchdog_and_stopping(
    nats_server: NatsServer, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    proc = subprocess.Popen(
        [sys.executable, "-m", "bacq", "verifier", "--nats", nats_server.url],
        env={**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready = _until(sock, "READY")
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"] == "serving"
        # the event loop pings every WatchdogSec/2 (0.5 s here): two pings in a row
        assert _until(sock, "WATCHDOG") == {"WATCHDOG": "1"}
        assert _until(sock, "WATCHDOG") == {"WATCHDOG": "1"}
        proc.send_signal(signal.SIGTERM)
        stopping = _until(sock, "STOPPING")
        assert stopping["STOPPING"] == "1"
        assert stopping["STATUS"].startswith("stopping")
        assert _until(sock, "STATUS")["STATUS"].startswith("stopped")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_without_notify_socket_notifications_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.ready("x") is False


def test_the_watchdog_interval_is_half_of_watchdog_sec_for_this_process_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


def test_an_abstract_notify_socket_is_reached(tmp_path: Path) -> None:
    name = f"bacq-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    try:
        notifier = Notifier("@" + name)
        assert notifier.status("running 2 jobs, 14 done")
        assert _read(sock) == {"STATUS": "running 2 jobs, 14 done"}
        notifier.close()
    finally:
        sock.close()


def test_ready_is_sent_even_when_the_service_logs_only_warnings(
    nats_server: NatsServer, notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    sock, path = notify_socket
    ready_file = tmp_path / "verifier.ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bacq", "verifier", "--nats", nats_server.url],
        env={
            **os.environ,
            "NOTIFY_SOCKET": path,
            "BACQ_LOG_LEVEL": "WARNING",
            "BACQ_READY_FILE": str(ready_file),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert _until(sock, "READY")["READY"] == "1"
        assert ready_file.read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert proc.stderr is not None
        assert b"service.ready" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
