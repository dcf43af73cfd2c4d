"""Shared fixtures: real devstacks (nats-server, kubo, dockerd), clients, and a CLI runner.

Every devstack here runs the real components; if one cannot start, the test fails (never skips).
A module that wants a devstack shared by its tests sets ``DEVSTACK = {...}`` (Devstack arguments)
and uses the ``stack`` fixture; a test that needs its own topology calls ``make_stack(...)``.
Devstacks run with a NATS user per process: connect as their client with
``Client.connect(stack.nats.url, options=stack.client_options())``; ``run_cli`` passes the
client's credentials through ``stack.env()``.

Markers (pick with ``-m``): each test is marked ``lab`` when it uses the lab, ``devstack`` when it
uses a fixture that starts real components (or says so with the marker), else ``unit``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest

from bacq.bus import Bus
from bacq.client import Client
from bacq.devstack import Devstack, NatsServer
from bacq.storage import Storage

TESTS = Path(__file__).parent
# fixtures that start real components (nats-server, kubo, dockerd, systemd in a container)
DEVSTACK_FIXTURES = frozenset(
    {
        "stack",
        "make_stack",
        "client",
        "storage",
        "nats_server",
        "bare_nats",
        "nats_with",
        "cluster",
        "machine",
        "executor",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test unit, devstack or lab (see the module docstring)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("lab") or "lab" in names:
            item.add_marker(pytest.mark.lab)
        elif (
            item.get_closest_marker("devstack")
            or item.get_closest_marker("integration")
            or names & DEVSTACK_FIXTURES
        ):
            item.add_marker(pytest.mark.devstack)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Devstack]:
    params: dict[str, Any] = getattr(request.module, "DEVSTACK", {})
    devstack = Devstack(**params)
    try:
        devstack.start()
        yield devstack
    finally:
        devstack.stop()


@pytest.fixture(scope="module")
def bare_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A nats-server of its own (JetStream on) without users, any subject allowed: its URL."""
    where = tmp_path_factory.mktemp("bare-nats")
    server = NatsServer(where / "store", where / "nats-server.log")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def scratch_bus(bare_nats: str, request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    """A requester's Bus on ``bare_nats`` with an empty stream of the test module's own:
    ``STREAM`` (its name) and ``SUBJECTS`` (its subjects) at the module's top level."""
    stream, subjects = request.module.STREAM, request.module.SUBJECTS
    connected = await Bus.connect(bare_nats, name=f"bacq-requester-{stream.lower()}")
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):  # (the server is the module's)
            await connected.js.delete_stream(stream)
        await connected.js.add_stream(name=stream, subjects=[subjects])
        yield connected
    finally:
        await connected.close()


@pytest.fixture
def make_stack() -> Iterator[Callable[..., Devstack]]:
    started: list[Devstack] = []

    def make(**params: Any) -> Devstack:
        devstack = Devstack(**params)
        started.append(devstack)
        return devstack.start()

    try:
        yield make
    finally:
        for devstack in started:
            devstack.stop()


@pytest.fixture
async def client(stack: Devstack) -> AsyncIterator[Client]:
    c = await Client.connect(stack.nats.url, options=stack.client_options())
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def storage(stack: Devstack) -> AsyncIterator[Storage]:
    """The client's kubo node (the first one); workers use both nodes."""
    s = await Storage.connect(stack.ipfs_api)
    try:
        yield s
    finally:
        await s.close()


def run_cli(
    stack: Devstack | None, *args: str, timeout: float = 180.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``bacq ARGS`` as a user would, against ``stack``; output is captured as text."""
    env = {**os.environ, "COLUMNS": "200"}
    if stack is not None:
        env.update(stack.env())
    else:  # nothing should be reached: point at a closed port
        env.update({"BACQ_NATS_URL": "nats://127.0.0.1:1", "BACQ_IPFS_API": "/ip4/127.0.0.1/tcp/1"})
    return subprocess.run(
        [sys.executable, "-m", "bacq", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        check=False,
    )
