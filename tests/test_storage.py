"""IPFS storage against a real kubo: stable CIDs, clear errors, safe fetches, pins."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from bacq.devstack import Devstack, find_ipfs
from bacq.errors import IpfsUnavailable, StorageError
from bacq.storage import Storage

DEVSTACK = {"workers": 0, "kubo_nodes": 2}


def _tree(base: Path) -> Path:
    (base / "sub" / "deeper").mkdir(parents=True)
    (base / "empty").write_bytes(b"")
    (base / ".hidden").write_text("dot\n")
    (base / "sub" / "a.txt").write_text("a\n")
    (base / "sub" / "deeper" / "b.bin").write_bytes(bytes(range(256)) * 5000)
    return base


async def test_folder_cid_matches_kubo_cli_and_is_stable(
    stack: Devstack, storage: Storage, tmp_path: Path
) -> None:
    folder = _tree(tmp_path / "results")
    cid = await storage.add(folder)
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
    copy = _tree(tmp_path / "elsewhere" / "results")
    assert await storage.add(copy) == cid  # same content, other place: same CID
    assert cid.startswith("bafy")


async def test_content_added_on_one_node_is_fetched_through_the_other(
    stack: Devstack, storage: Storage, tmp_path: Path
) -> None:
    cid = await storage.add(_tree(tmp_path / "src"))
    other = await Storage.connect(stack.kubo[1].api)
    try:
        got = await other.fetch(cid, tmp_path / "dst", timeout=30)
    finally:
        await other.close()
    assert (got / "sub" / "deeper" / "b.bin").read_bytes() == bytes(range(256)) * 5000
    assert (got / ".hidden").read_text() == "dot\n"
    assert (got / "empty").read_bytes() == b""


async def test_single_file_fetch_lands_at_the_target(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "one.txt"
    source.write_text("just one\n")
    cid = await storage.add(source)
    assert cid.startswith("bafk")  # a raw leaf
    assert (await storage.fetch(cid, tmp_path / "copy.txt")).read_text() == "just one\n"
    await storage.pin(cid)


async def test_adding_a_missing_path_is_an_error(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such file or directory"):
        await storage.add(tmp_path / "nope")


async def test_fetch_refuses_a_non_empty_target(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "f.txt"
    source.write_text("x")
    cid = await storage.add(source)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(StorageError, match="not empty"):
        await storage.fetch(cid, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


async def test_unreachable_kubo_is_a_clear_error() -> None:
    with pytest.raises(
        IpfsUnavailable, match=re.escape("no kubo RPC API answers at /ip4/127.0.0.1/tcp/1")
    ):
        await Storage.connect("/ip4/127.0.0.1/tcp/1")


def _local_blocks(stack: Devstack) -> set[str]:
    done = subprocess.run(
        [find_ipfs(), "--api", stack.ipfs_api, "refs", "local"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(done.stdout.split())


async def test_only_hash_gives_the_cid_of_a_real_add_without_storing_a_block(
    stack: Devstack, storage: Storage, tmp_path: Path
) -> None:
    folder = tmp_path / "commit"
    (folder / "nested" / "deeper" / "deepest").mkdir(parents=True)
    (folder / "empty").write_bytes(b"")
    (folder / "nested" / "also-empty").write_bytes(b"")
    (folder / "nested" / "deeper" / "deepest" / "note.txt").write_bytes(os.urandom(100))
    (folder / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024 + 17))  # 21 chunks
    big_alone = tmp_path / "big.bin"
    big_alone.write_bytes((folder / "big.bin").read_bytes())

    before = _local_blocks(stack)
    committed = await storage.add(folder, only_hash=True)
    big_cid = await storage.add(big_alone, only_hash=True)
    assert _local_blocks(stack) == before  # not one block written
    assert not await storage.has_block(committed)
    assert not await storage.has_block(big_cid)

    revealed = await storage.add(folder)
    assert revealed == committed
    assert await storage.has_block(committed)
    assert await storage.has_block(big_cid)  # the same file inside the folder: the same DAG
    assert len(_local_blocks(stack) - before) >= 21 + 4  # chunks, file root, folders


async def test_long_and_unusual_names_come_back_as_they_went_in(
    storage: Storage, tmp_path: Path
) -> None:
    source = tmp_path / "names"
    deep = source / ("a" * 100) / ("b" * 100) / ("ü" * 60)
    deep.mkdir(parents=True)
    (deep / ("c" * 200)).write_bytes(os.urandom(1000))
    for name in ("sp ace", "plus+sign", "per%cent", 'quo"te', "new\nline", "é"):
        (source / name).write_text(name)
    cid = await storage.add(source)
    got = await storage.fetch(cid, tmp_path / "back")
    assert sorted(p.relative_to(got) for p in got.rglob("*")) == sorted(
        p.relative_to(source) for p in source.rglob("*")
    )
    assert (got / deep.relative_to(source) / ("c" * 200)).read_bytes() == (
        deep / ("c" * 200)
    ).read_bytes()
    assert (got / "new\nline").read_text() == "new\nline"
