"""IPFS storage against a real kubo: stable CIDs, clear errors, safe fetches, pins."""

from __future__ import annotations

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
