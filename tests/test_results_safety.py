"""Fetching results never writes outside the output folder, whatever the archive holds."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from bacq.devstack import Devstack, find_ipfs
from bacq.errors import StorageError
from bacq.models import JobRecord, encode
from bacq.spec import JobSpec
from bacq.states import JobState
from bacq.storage import safe_extract
from tests.conftest import run_cli

DEVSTACK = {"workers": 0, "kubo_nodes": 1}


def _tar(path: Path, entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for info in entries:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)


def test_extract_refuses_dotdot_paths_out_of_the_destination(tmp_path: Path) -> None:
    archive, dest = tmp_path / "a.tar", tmp_path / "deep" / "dest"
    dest.mkdir(parents=True)
    evil = "root/../../escaped.txt"
    entries = [tarfile.TarInfo("root/ok.txt"), tarfile.TarInfo(evil)]
    _tar(archive, entries, {"root/ok.txt": b"ok", evil: b"x"})
    with pytest.raises(StorageError, match="refused an unsafe archive entry"):
        safe_extract(archive, dest)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "deep" / "escaped.txt").exists()


def test_extract_keeps_absolute_paths_inside_the_destination(tmp_path: Path) -> None:
    archive, dest = tmp_path / "a.tar", tmp_path / "dest"
    dest.mkdir()
    absolute = str(tmp_path / "absolute-escape.txt")
    _tar(archive, [tarfile.TarInfo(absolute)], {absolute: b"x"})
    safe_extract(archive, dest)
    assert not Path(absolute).exists()
    assert (dest / absolute.lstrip("/")).read_bytes() == b"x"


def test_extract_refuses_a_symlink_pointing_out(tmp_path: Path) -> None:
    link = tarfile.TarInfo("root/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "../../../outside"
    archive, dest = tmp_path / "a.tar", tmp_path / "dest"
    dest.mkdir()
    _tar(archive, [link], {})
    with pytest.raises(StorageError):
        safe_extract(archive, dest)
    assert not (dest / "root" / "link").is_symlink()


def _dag_put(stack: Devstack, node: dict[str, object]) -> str:
    done = subprocess.run(
        [
            find_ipfs(),
            "--api",
            stack.ipfs_api,
            "dag",
            "put",
            "--input-codec",
            "dag-json",
            "--store-codec",
            "dag-pb",
        ],
        input=json.dumps(node),
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _unixfs(data: bytes) -> dict[str, str]:
    return {"/": {"bytes": base64.b64encode(data).decode().rstrip("=")}}  # type: ignore[dict-item]


async def test_get_of_a_result_whose_tar_holds_dotdot_paths_writes_nothing_outside(
    stack: Devstack, tmp_path: Path
) -> None:
    # a results folder kubo serves as a tar with a '../' symlink: a lying worker could publish it
    target = "../../../../../../../../" + str(tmp_path / "escaped").lstrip("/")
    symlink = _dag_put(
        stack,
        {"Data": _unixfs(b"\x08\x04\x12" + bytes([len(target)]) + target.encode()), "Links": []},
    )
    root = _dag_put(
        stack,
        {
            "Data": _unixfs(b"\x08\x01"),  # a UnixFS directory
            "Links": [{"Hash": {"/": symlink}, "Name": "stdout", "Tsize": 40}],
        },
    )
    listing = subprocess.run(
        [
            find_ipfs(),
            "--api",
            stack.ipfs_api,
            "get",
            "-a",
            "-o",
            str(tmp_path / "check.tar"),
            root,
        ],
        capture_output=True,
        check=True,
    )
    assert listing.returncode == 0
    with tarfile.open(tmp_path / "check.tar") as tar:
        assert any(m.linkname.startswith("../") for m in tar.getmembers())

    # a job record naming it as the accepted result, as a compromised requester might write
    from bacq.bus import Bus

    bus = await Bus.connect(
        stack.nats.url, name="bacq-requester-test", options=stack.nats_options("requester")
    )
    try:
        job = JobRecord(
            id="j-evilresult", spec=JobSpec(image="x"), state=JobState.ACCEPTED, result_cid=root
        )
        await bus.jobs.put(job.id, encode(job))
    finally:
        await bus.close()

    out = tmp_path / "out"
    done = run_cli(stack, "get", "j-evilresult", "--output-dir", str(out))
    assert done.returncode == 1
    assert "refused an unsafe archive entry" in done.stderr
    assert not (tmp_path / "escaped").exists()
    assert not out.exists() or not any(out.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bacq")] == []
