"""Fetches are bounded: a DAG over the caller's size or entry limits is refused before its data is
downloaded, and a DAG that lies about its size is stopped while it is extracted. Real kubo nodes:
content is added on one and fetched through the other, whose blocks show what was downloaded."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from bacq.devstack import Devstack, find_ipfs
from bacq.errors import StorageError
from bacq.kubo import KuboHttp
from bacq.storage import Storage

DEVSTACK = {"workers": 0, "kubo_nodes": 2}


class _Lean:
    """A Storage whose fetch is the CLI's blocking client's (bacq.kubo), run in a thread."""

    def __init__(self, storage: Storage, kubo: KuboHttp) -> None:
        self._storage = storage
        self._kubo = kubo

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    async def fetch(self, cid: str, target: Path, **limits: Any) -> Path:
        return await asyncio.to_thread(self._kubo.fetch, cid, target, **limits)


@pytest.fixture
async def remote_storage(stack: Devstack) -> AsyncIterator[Storage]:
    """The second kubo node, which has none of the content the tests add on the first."""
    s = await Storage.connect(stack.kubo[1].api)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=["storage", "cli-client"])
async def remote(
    request: pytest.FixtureRequest, stack: Devstack, remote_storage: Storage
) -> Storage:
    """The second kubo node; its fetch is Storage's, or the CLI's blocking client's (bacq.kubo):
    both must refuse the same DAGs the same way."""
    if request.param == "storage":
        return remote_storage
    kubo = KuboHttp.for_maddr(stack.kubo[1].api)
    assert kubo is not None
    return cast(Storage, _Lean(remote_storage, kubo))


def _ipfs(stack: Devstack, *args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(
        [find_ipfs(), "--api", stack.ipfs_api, *args], input=stdin, capture_output=True, check=True
    )
    return done.stdout.decode().strip()


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _pb_node(stack: Devstack, data: bytes, links: list[tuple[str, str, int]]) -> str:
    """A dag-pb node: UnixFS ``data`` and (name, cid, claimed size) links, as anyone may write."""
    node = {
        "Data": {"/": {"bytes": base64.b64encode(data).decode().rstrip("=")}},
        "Links": [{"Hash": {"/": cid}, "Name": name, "Tsize": size} for name, cid, size in links],
    }
    return _ipfs(
        stack,
        "dag",
        "put",
        "--input-codec",
        "dag-json",
        "--store-codec",
        "dag-pb",
        stdin=json.dumps(node).encode(),
    )


UNIXFS_DIR = b"\x08\x01"


def _raw_block(stack: Devstack, data: bytes) -> str:
    return _ipfs(stack, "block", "put", "--cid-codec", "raw", stdin=data)


def _leaves(stack: Devstack, cid: str) -> list[str]:
    return _ipfs(stack, "refs", "-r", "--unique", cid).split()


def _no_leftovers(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if p.name.startswith(".bacq-fetch")] == []


async def test_a_file_over_the_byte_limit_is_refused_before_its_data_is_downloaded(
    stack: Devstack, storage: Storage, remote: Storage, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    cid = await storage.add(big)
    with pytest.raises(StorageError) as caught:
        await remote.fetch(cid, tmp_path / "got", max_bytes=1024 * 1024, timeout=30)
    message = str(caught.value)
    assert cid in message
    assert "3.0 MiB (3145728 bytes)" in message
    assert "limit of 1.0 MiB (1048576 bytes)" in message
    assert "nothing was downloaded" in message
    assert not (tmp_path / "got").exists()
    _no_leftovers(tmp_path)
    for leaf in _leaves(stack, cid):  # only the file's root block was read, none of its chunks
        assert not await remote.has_block(leaf)
    # within the limit, the same fetch works
    got = await remote.fetch(cid, tmp_path / "ok", max_bytes=3 * 1024 * 1024, timeout=30)
    assert got.read_bytes() == big.read_bytes()


async def test_a_folder_over_the_byte_limit_is_refused_before_its_data_is_downloaded(
    stack: Devstack, storage: Storage, remote: Storage, tmp_path: Path
) -> None:
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.bin").write_bytes(os.urandom(700 * 1024))
    (folder / "b.bin").write_bytes(os.urandom(700 * 1024))
    cid = await storage.add(folder)
    with pytest.raises(StorageError, match=r"more than the limit of 1\.0 MiB \(1048576 bytes\)"):
        await remote.fetch(cid, tmp_path / "got", max_bytes=1024 * 1024, timeout=30)
    assert not (tmp_path / "got").exists()
    a_cid = await storage.add(folder / "sub" / "a.bin", only_hash=True)
    for leaf in _leaves(stack, a_cid):
        assert not await remote.has_block(leaf)


async def test_a_folder_over_the_entry_limit_is_refused_before_download(
    storage: Storage, remote: Storage, tmp_path: Path
) -> None:
    folder = tmp_path / "many"
    (folder / "sub").mkdir(parents=True)
    for i in range(60):
        (folder / "sub" / f"{i}.txt").write_text(f"{i} {os.urandom(8).hex()}\n")
    cid = await storage.add(folder)
    with pytest.raises(StorageError) as caught:
        await remote.fetch(cid, tmp_path / "got", max_entries=50, timeout=30)
    assert f"{cid} holds more than 50 entries" in str(caught.value)
    assert not (tmp_path / "got").exists()
    _no_leftovers(tmp_path)
    got = await remote.fetch(cid, tmp_path / "ok", max_entries=62, timeout=30)  # 60 + 2 folders
    assert len(list((got / "sub").iterdir())) == 60


async def test_a_dag_of_many_tiny_entries_is_refused_by_the_walk(
    stack: Devstack, remote: Storage, tmp_path: Path
) -> None:
    # a few hundred bytes of blocks that expand to 10^6 files: each folder links the next 10 times
    empty = _raw_block(stack, b"")
    level = _pb_node(stack, UNIXFS_DIR, [(f"f{i}", empty, 0) for i in range(10)])
    for _ in range(5):
        level = _pb_node(stack, UNIXFS_DIR, [(f"d{i}", level, 1) for i in range(10)])
    with pytest.raises(StorageError, match=f"{level} holds more than 10000 entries"):
        await remote.fetch(level, tmp_path / "got", max_entries=10_000, timeout=60)
    assert not (tmp_path / "got").exists()
    _no_leftovers(tmp_path)


async def test_a_dag_that_links_one_file_many_times_is_refused_by_its_total_size(
    stack: Devstack, storage: Storage, remote: Storage, tmp_path: Path
) -> None:
    one = tmp_path / "one.bin"
    one.write_bytes(os.urandom(256 * 1024))
    file_cid = await storage.add(one)
    root = _pb_node(stack, UNIXFS_DIR, [(f"copy{i}", file_cid, 256 * 1024) for i in range(100)])
    with pytest.raises(StorageError, match=f"{root} holds at least"):
        await remote.fetch(root, tmp_path / "got", max_bytes=10 * 1024 * 1024, timeout=30)
    assert not await remote.has_block(file_cid)  # a raw leaf: the walk reads no data at all


async def test_a_folder_that_understates_a_file_size_is_stopped_during_the_download(
    stack: Devstack, remote: Storage, tmp_path: Path
) -> None:
    # the folder claims its entry holds 1 byte; the raw block behind it holds 512 KiB
    raw = _raw_block(stack, os.urandom(512 * 1024))
    root = _pb_node(stack, UNIXFS_DIR, [("small.txt", raw, 1)])
    with pytest.raises(StorageError, match="the download was stopped"):
        await remote.fetch(root, tmp_path / "got", max_bytes=100 * 1024, timeout=30)
    assert not (tmp_path / "got").exists()
    _no_leftovers(tmp_path)
    # within the byte limit, the size the DAG claimed and what kubo sent differ: refused too
    with pytest.raises(StorageError, match="does not match its DAG"):
        await remote.fetch(root, tmp_path / "got", timeout=30)
    assert not (tmp_path / "got").exists()


async def test_a_file_that_lies_about_its_size_is_refused_as_an_archive_that_ends_early(
    stack: Devstack, remote: Storage, tmp_path: Path
) -> None:
    # a UnixFS file root that says 10 bytes over a 512 KiB chunk: kubo's tar writer stops
    # ("write too long", in an X-Stream-Error trailer that aiohttp does not expose), so the
    # archive ends in the middle of the entry; the reader refuses it
    raw = _raw_block(stack, os.urandom(512 * 1024))
    data = b"\x08\x02\x18" + _varint(10) + b"\x20" + _varint(512 * 1024)
    liar = _pb_node(stack, data, [("", raw, 512 * 1024)])
    root = _pb_node(stack, UNIXFS_DIR, [("liar.bin", liar, 10)])
    with pytest.raises(StorageError, match=f"the archive of {root} ends early"):
        await remote.fetch(root, tmp_path / "got", max_bytes=100 * 1024, timeout=30)
    assert not (tmp_path / "got").exists()
    _no_leftovers(tmp_path)


async def test_entry_names_with_slashes_or_dotdot_are_refused_before_download(
    stack: Devstack, remote: Storage, tmp_path: Path
) -> None:
    leaf = _raw_block(stack, b"x")
    for name in ("../escape", "a/b", ".."):
        root = _pb_node(stack, UNIXFS_DIR, [(name, leaf, 1)])
        with pytest.raises(StorageError, match="refused an unsafe archive entry"):
            await remote.fetch(root, tmp_path / "got", timeout=30)
        assert not (tmp_path / "got").exists()
    assert not (tmp_path.parent / "escape").exists()


async def test_a_fetch_that_no_node_can_serve_ends_at_its_deadline_and_lets_go(
    remote: Storage, tmp_path: Path
) -> None:
    # a CID of content that exists nowhere: kubo would look for it for ever
    missing = await remote.add(_write(tmp_path / "nowhere.bin", os.urandom(64)), only_hash=True)
    with pytest.raises(StorageError, match=f"could not fetch {missing} from IPFS within 2s"):
        await remote.fetch(missing, tmp_path / "got", timeout=2)
    assert not (tmp_path / "got").exists()
    _no_leftovers(tmp_path)
    # no thread of the fetch is left behind, and the client still talks to kubo
    assert [t for t in threading.enumerate() if t.name.startswith("bacq-kubo")] == []
    assert not await remote.has_block(missing)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


async def test_a_fetch_cancelled_mid_download_stops_writing_and_leaves_nothing(
    storage: Storage, remote_storage: Storage, tmp_path: Path
) -> None:
    remote = remote_storage  # Storage's (the CLI's blocking client ends with its process)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(64 * 1024 * 1024))
    cid = await storage.add(source)
    dest = tmp_path / "dest"
    dest.mkdir()
    task = asyncio.create_task(remote.fetch(cid, dest / "got", timeout=120))
    partial = None
    async with asyncio.timeout(60):  # until the file being extracted has its first bytes
        while partial is None and not task.done():
            partial = next((p for p in dest.glob(".bacq-fetch-*/*") if p.stat().st_size), None)
            await asyncio.sleep(0.01)
    assert partial is not None, "the fetch ended before it could be cancelled"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(dest.iterdir()) == []  # the partial download is gone
    assert [t for t in threading.enumerate() if t.name.startswith("bacq-kubo")] == []
