"""The CLI's blocking kubo client (bacq.kubo) against a real kubo: the same CIDs as Storage.add and
the kubo CLI, the same trees back as Storage.fetch, clear errors, a deadline. Its limits and the
hostile DAGs are in tests/test_storage_limits.py, run against both clients."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bacq.devstack import Devstack, find_ipfs
from bacq.errors import IpfsUnavailable, StorageError
from bacq.kubo import KuboHttp
from bacq.storage import Storage

DEVSTACK = {"workers": 0, "kubo_nodes": 2}


def _kubo(maddr: str, timeout: float = 60.0) -> KuboHttp:
    kubo = KuboHttp.for_maddr(maddr, timeout=timeout)
    assert kubo is not None
    return kubo


def _tree(base: Path) -> Path:
    (base / "sub" / "deeper").mkdir(parents=True)
    (base / "empty").write_bytes(b"")
    (base / ".hidden").write_text("dot\n")
    (base / "sub" / "a.txt").write_text("a\n")
    (base / "sub" / "deeper" / "b.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (base / "sub" / "deeper" / "empty-folder").mkdir()
    (base / "odd name & ü?.txt").write_text("odd\n")
    return base


def test_multiaddrs_it_takes_and_the_ones_it_leaves_to_storage() -> None:
    kubo = KuboHttp.for_maddr("/ip4/127.0.0.1/tcp/5001")
    assert kubo is not None
    assert (kubo.host, kubo.port) == ("127.0.0.1", 5001)
    dns = KuboHttp.for_maddr("/dns4/kubo.internal/tcp/5001")
    assert dns is not None
    assert dns.host == "kubo.internal"
    for other in (
        "",
        "127.0.0.1:5001",
        "/ip4/127.0.0.1/udp/5001",
        "/unix/tmp/k.sock",
        "/ip4/127.0.0.1/tcp/0",
        "/ip4/127.0.0.1/tcp/x",
        "/ip4//tcp/5001",
        "/ip4/127.0.0.1/tcp/5001/http",
    ):
        assert KuboHttp.for_maddr(other) is None, other


async def test_add_gives_the_cid_of_storage_and_of_the_kubo_cli(
    stack: Devstack, storage: Storage, tmp_path: Path
) -> None:
    folder = _tree(tmp_path / "results")
    kubo = _kubo(stack.ipfs_api)
    cid = await asyncio.to_thread(kubo.add, folder)
    assert cid == await storage.add(folder, only_hash=True)
    cli = subprocess.run(
        [
            find_ipfs(),
            "--api",
            stack.ipfs_api,
            "add",
            "-r",
            "-Q",
            "--hidden",
            "--cid-version",
            "1",
            str(folder),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert cid == cli.stdout.strip()
    single = folder / "sub" / "deeper" / "b.bin"
    assert await asyncio.to_thread(kubo.add, single) == await storage.add(single, only_hash=True)
    assert await storage.has_block(cid)  # stored (and pinned), not only hashed


async def test_fetch_through_the_other_node_gives_the_same_tree_as_storage(
    stack: Devstack, storage: Storage, tmp_path: Path
) -> None:
    folder = _tree(tmp_path / "src")
    cid = await storage.add(folder)
    other = _kubo(stack.kubo[1].api)
    got = await asyncio.to_thread(other.fetch, cid, tmp_path / "lean", timeout=60)
    reference = await storage.fetch(cid, tmp_path / "ref")

    def listing(root: Path) -> list[tuple[str, bytes | None]]:
        return sorted(
            (str(p.relative_to(root)), p.read_bytes() if p.is_file() else None)
            for p in root.rglob("*")
        )

    assert listing(got) == listing(reference) == listing(folder)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bacq-fetch")]
    one = await asyncio.to_thread(
        other.fetch, await storage.add(folder / "sub" / "a.txt"), tmp_path / "one.txt"
    )
    assert one.read_text() == "a\n"


async def test_adding_a_missing_path_or_fetching_into_a_full_folder_is_an_error(
    stack: Devstack, tmp_path: Path
) -> None:
    kubo = _kubo(stack.ipfs_api)
    with pytest.raises(StorageError, match="no such file or directory"):
        kubo.add(tmp_path / "nope")
    source = tmp_path / "f.txt"
    source.write_text("x")
    cid = await asyncio.to_thread(kubo.add, source)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(StorageError, match="not empty"):
        kubo.fetch(cid, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(StorageError, match="kubo cannot stat not-a-cid"):
        await asyncio.to_thread(kubo.fetch, "not-a-cid", tmp_path / "bad")


def test_unreachable_kubo_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubo = _kubo(f"/ip4/127.0.0.1/tcp/{port}")
    (tmp_path / "f").write_text("x")
    for call in (lambda: kubo.add(tmp_path / "f"), lambda: kubo.fetch("bafyx", tmp_path / "g")):
        with pytest.raises(
            IpfsUnavailable,
            match=re.escape(f"no kubo RPC API answers at /ip4/127.0.0.1/tcp/{port}"),
        ):
            call()


def test_a_kubo_that_never_answers_ends_at_the_deadline(tmp_path: Path) -> None:
    """A listener that accepts and says nothing: the add and the fetch end at their deadline."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        kubo = _kubo(f"/ip4/127.0.0.1/tcp/{server.getsockname()[1]}", timeout=1.0)
        (tmp_path / "f").write_text("x")
        started = time.monotonic()
        with pytest.raises(StorageError, match="took longer than 1s"):
            kubo.add(tmp_path / "f")
        with pytest.raises(StorageError, match="could not fetch bafyx from IPFS within 1s"):
            kubo.fetch("bafyx", tmp_path / "got")
        assert time.monotonic() - started < 30
        assert not (tmp_path / "got").exists()
    finally:
        stop.set()
        thread.join()
        server.close()
        for conn in held:
            conn.close()


def test_a_file_that_shrinks_while_it_is_added_is_named(stack: Devstack, tmp_path: Path) -> None:
    from bacq.storage import _AddForm

    source = tmp_path / "shrinks.bin"
    source.write_bytes(os.urandom(256 * 1024))
    form = _AddForm.build(source)
    source.write_bytes(b"short")  # after the form counted its size
    kubo = _kubo(stack.ipfs_api, timeout=30)
    with pytest.raises(StorageError, match="changed while it was being added"):
        kubo._send_form(form, {"cid-version": "1"}, "adding", time.monotonic() + 30)


async def test_bacq_ipfs_add_and_get_use_neither_aiohttp_nor_aioipfs(
    stack: Devstack, storage: Storage, tmp_path: Path
) -> None:
    """The CLI's data path is the blocking client: no asyncio, aiohttp, aioipfs, nats-py or
    pydantic to import, for `bacq ipfs add` and for `bacq get` of a job's results."""

    from bacq.bus import Bus
    from bacq.models import JobRecord, encode
    from bacq.spec import JobSpec
    from bacq.states import JobState
    from tests.test_cli_startup import loaded_by, packages

    (tmp_path / "in.txt").write_text("data\n")
    loaded = loaded_by(tmp_path, "ipfs", "add", str(tmp_path / "in.txt"), env=stack.env())
    assert not packages(loaded) & {"aiohttp", "aioipfs", "pydantic", "nats", "rich", "asyncio"}
    assert "bacq.storage" not in loaded

    results = tmp_path / "results"
    (results / "out").mkdir(parents=True)
    (results / "stdout").write_text("hi\n")
    (results / "out" / "f.txt").write_text("f\n")
    cid = await storage.add(results)
    bus = await Bus.connect(
        stack.nats.url, name="bacq-requester-test", options=stack.nats_options("requester")
    )
    try:
        job = JobRecord(
            id="j-leanget",
            spec=JobSpec(image="x", outputs=[{"name": "out", "path": "/out"}]),
            state=JobState.ACCEPTED,
            result_cid=cid,
        )
        await bus.jobs.put(job.id, encode(job))
    finally:
        await bus.close()
    got = tmp_path / "got"
    loaded = loaded_by(tmp_path, "get", "j-leanget", "--output-dir", str(got), env=stack.env())
    assert not packages(loaded) & {"aiohttp", "aioipfs", "pydantic", "nats", "rich", "asyncio"}
    assert "bacq.kubo" in loaded
    assert "bacq.storage" not in loaded  # bacq.unixfs: the walk and extractor, no asyncio
    assert (got / "out" / "f.txt").read_text() == "f\n"
    assert (got / "stdout").read_text() == "hi\n"


async def test_read_tail_gives_the_end_of_a_file_as_storage_does(
    stack: Devstack, storage: Storage, tmp_path: Path
) -> None:
    folder = tmp_path / "result"
    folder.mkdir()
    (folder / "stdout").write_bytes(b"".join(b"line %d\n" % i for i in range(20_000)))
    (folder / "stderr").write_bytes(b"")
    cid = await storage.add(folder)
    kubo = _kubo(stack.ipfs_api)
    for name, limit in (("stdout", 1000), ("stdout", 64 * 1024), ("stderr", 1000)):
        got = await asyncio.to_thread(kubo.read_tail, f"{cid}/{name}", limit=limit)
        assert got == await storage.read_tail(f"{cid}/{name}", limit=limit)
        assert got == (folder / name).read_bytes()[-limit:]
    with pytest.raises(StorageError, match="kubo cannot stat"):
        await asyncio.to_thread(kubo.read_tail, f"{cid}/missing")
