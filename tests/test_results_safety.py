"""Fetching results never writes outside the output folder, whatever the archive holds."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from bacq.devstack import Devstack, find_ipfs
from bacq.errors import ResultsTooLarge, StorageError
from bacq.models import JobRecord, encode
from bacq.spec import JobSpec
from bacq.states import JobState
from bacq.storage import safe_extract, sanitize_tree
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


def test_extract_refuses_absolute_paths(tmp_path: Path) -> None:
    archive, dest = tmp_path / "a.tar", tmp_path / "dest"
    dest.mkdir()
    absolute = str(tmp_path / "absolute-escape.txt")
    _tar(archive, [tarfile.TarInfo(absolute)], {absolute: b"x"})
    with pytest.raises(StorageError, match="absolute"):
        safe_extract(archive, dest)
    assert not Path(absolute).exists()
    assert list(dest.iterdir()) == []


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


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info


def test_extract_refuses_a_link_that_climbs_after_naming_a_link(tmp_path: Path) -> None:
    # 'here' -> '.', then 'out' -> 'here/../x': lexically inside, really one level up
    archive, dest = tmp_path / "a.tar", tmp_path / "dest"
    dest.mkdir()
    entries = [
        _entry("root", tarfile.DIRTYPE),
        _entry("root/here", tarfile.SYMTYPE, "."),
        _entry("root/out", tarfile.SYMTYPE, "here/../../x"),
    ]
    _tar(archive, entries, {})
    with pytest.raises(StorageError, match=r"'\.\.' after a name"):
        safe_extract(archive, dest)
    assert not (dest / "root" / "out").is_symlink()


def test_extract_keeps_links_that_stay_inside(tmp_path: Path) -> None:
    archive, dest = tmp_path / "a.tar", tmp_path / "dest"
    dest.mkdir()
    entries = [
        _entry("root", tarfile.DIRTYPE),
        _entry("root/lib", tarfile.DIRTYPE),
        _entry("root/lib/data.txt"),
        _entry("root/bin", tarfile.DIRTYPE),
        _entry("root/bin/data", tarfile.SYMTYPE, "../lib/data.txt"),
    ]
    _tar(archive, entries, {"root/lib/data.txt": b"inside"})
    size = safe_extract(archive, dest)
    assert (dest / "root" / "bin" / "data").read_bytes() == b"inside"
    assert (size.entries, size.bytes) == (5, 6)


def test_extract_never_writes_through_a_link_or_over_an_entry(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for entries in (
        # a link (to its own folder), then a file under the link
        [
            _entry("root", tarfile.DIRTYPE),
            _entry("root/l", tarfile.SYMTYPE, "."),
            _entry("root/l/f"),
        ],
        # the same name twice: a file, then a link
        [_entry("root/f"), _entry("root/f", tarfile.SYMTYPE, "g")],
        # a file, then a folder of the same name
        [_entry("root/f"), _entry("root/f/g")],
    ):
        archive, dest = tmp_path / "a.tar", tmp_path / "dest"
        dest.mkdir()
        _tar(archive, entries, {"root/f": b"x", "root/l/f": b"x", "root/f/g": b"x"})
        with pytest.raises(StorageError, match="refused an unsafe archive entry"):
            safe_extract(archive, dest)
        assert list(outside.iterdir()) == []
        shutil.rmtree(dest)


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.CHRTYPE, "device file"),
        (tarfile.BLKTYPE, "device file"),
        (tarfile.FIFOTYPE, "FIFO"),
    ],
)
def test_extract_refuses_hard_links_devices_and_fifos(
    tmp_path: Path, kind: bytes, what: str
) -> None:
    archive, dest = tmp_path / "a.tar", tmp_path / "dest"
    dest.mkdir()
    _tar(archive, [_entry("ok.txt"), _entry("odd", kind, "ok.txt")], {"ok.txt": b"fine"})
    with pytest.raises(StorageError, match=f"'odd' is a {what}"):
        safe_extract(archive, dest)
    assert not (dest / "odd").exists()


def test_extract_stops_at_the_byte_and_entry_limits(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    names = [f"f{i}" for i in range(10)]
    _tar(archive, [_entry(n) for n in names], dict.fromkeys(names, b"0123456789"))
    (tmp_path / "d1").mkdir()
    with pytest.raises(StorageError, match=r"more than 50 B \(50 bytes\), the limit"):
        safe_extract(archive, tmp_path / "d1", max_bytes=50)
    assert sum(p.stat().st_size for p in (tmp_path / "d1").iterdir()) <= 50
    (tmp_path / "d2").mkdir()
    with pytest.raises(StorageError, match="more than 4 entries"):
        safe_extract(archive, tmp_path / "d2", max_entries=4)
    assert len(list((tmp_path / "d2").iterdir())) == 4
    (tmp_path / "d3").mkdir()
    assert safe_extract(archive, tmp_path / "d3", max_bytes=100, max_entries=10).entries == 10


@pytest.mark.parametrize("form", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_extract_reads_long_names_in_pax_and_gnu_headers(tmp_path: Path, form: int) -> None:
    archive, dest = tmp_path / "a.tar", tmp_path / "dest"
    dest.mkdir()
    deep = "root/" + "/".join(["d" * 60] * 4) + "/" + "é" * 100  # a path over 255 bytes, not ASCII
    with tarfile.open(archive, "w", format=form) as tar:
        for depth in range(5):
            tar.addfile(_entry("/".join(deep.split("/")[: depth + 1]), tarfile.DIRTYPE))
        data = os.urandom(3000)
        info = _entry(deep + "/f")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.addfile(_entry("root/link", tarfile.SYMTYPE, deep[5:] + "/f"))
    size = safe_extract(archive, dest)
    assert (dest / deep / "f").read_bytes() == data
    assert (dest / "root" / "link").read_bytes() == data
    assert (size.entries, size.bytes) == (7, 3000)


def _results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    (root / "out" / "sub").mkdir(parents=True)
    (root / "stdout").write_bytes(b"o" * 100)
    (root / "stderr").write_bytes(b"")
    (root / "out" / "sub" / "data").write_bytes(b"d" * 50)
    return root


def test_sanitize_removes_links_and_fifos_and_names_them(tmp_path: Path) -> None:
    root = _results(tmp_path)
    (root / "out" / "passwd").symlink_to("/etc/passwd")
    (root / "out" / "dirlink").symlink_to("/etc")
    os.mkfifo(root / "out" / "sub" / "pipe")
    removed = sanitize_tree(root)
    assert sorted(removed) == ["out/dirlink", "out/passwd", "out/sub/pipe"]
    assert sorted(p.name for p in (root / "out").rglob("*")) == ["data", "sub"]


def test_sanitize_caps_the_entries(tmp_path: Path) -> None:
    root = _results(tmp_path)
    for i in range(20):
        (root / "out" / f"{i}.txt").write_bytes(b"")
    assert sanitize_tree(root, max_entries=25) == []  # 20 + stdout, stderr, out, sub, data
    with pytest.raises(ResultsTooLarge, match="more than 24 entries"):
        sanitize_tree(root, max_entries=24)


def test_sanitize_caps_the_bytes_stdout_included(tmp_path: Path) -> None:
    root = _results(tmp_path)
    assert sanitize_tree(root, max_bytes=150) == []
    with pytest.raises(ResultsTooLarge, match=r"stdout and stderr\) hold more than 149 B"):
        sanitize_tree(root, max_bytes=149)


def test_sanitize_counts_a_sparse_file_at_its_full_size(tmp_path: Path) -> None:
    root = _results(tmp_path)
    with (root / "out" / "sparse").open("wb") as handle:
        handle.truncate(1 << 40)  # 1 TiB of nothing on disk; an add would read all of it
    with pytest.raises(ResultsTooLarge):
        sanitize_tree(root, max_bytes=1 << 30)


def test_sanitize_fails_when_an_entry_cannot_be_stated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as root every stat succeeds; stand in for a file system that refuses one
    root = _results(tmp_path)
    real_scandir = os.scandir

    class Refusing:
        def __init__(self, entry: os.DirEntry[str]) -> None:
            self.entry, self.name, self.path = entry, entry.name, entry.path

        def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
            if self.name == "data":
                raise PermissionError(13, "Permission denied", self.path)
            return self.entry.stat(follow_symlinks=follow_symlinks)

    class Listing:
        def __init__(self, path: Path) -> None:
            self.inner = real_scandir(path)

        def __enter__(self) -> Listing:
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.close()

        def __iter__(self) -> Listing:
            return self

        def __next__(self) -> Refusing:
            return Refusing(next(self.inner))

    monkeypatch.setattr("bacq.storage.os.scandir", Listing)
    with pytest.raises(StorageError, match=r"cannot stat out/sub/data in the results"):
        sanitize_tree(root)


def test_sanitize_fails_when_a_folder_cannot_be_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _results(tmp_path)
    real_scandir = os.scandir

    def scandir(path: Path) -> object:
        if Path(path).name == "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr("bacq.storage.os.scandir", scandir)
    with pytest.raises(StorageError, match=r"cannot list out/sub in the results"):
        sanitize_tree(root)


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
