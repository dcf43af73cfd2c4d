"""UnixFS trees on the local side, without I/O to kubo: the pre-download walk of a CID's DAG
(``Walk``, fed kubo's ``files/stat`` and ``ls`` answers), its limits, kubo's add form for a path
(``_AddForm``), the strict extraction of kubo's tar stream (``_extract_stream``, ``safe_extract``)
and the check of a job's output folder (``sanitize_tree``).

Shared by ``bacq.storage`` (the asyncio client of services and the Python API) and ``bacq.kubo``
(the CLI's blocking client), so that both walk, bound and extract alike; it imports neither
asyncio nor aiohttp. Touches only the local paths it is handed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

from bacq.errors import ResultsTooLarge, StorageError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "TreeSize",
    "Walk",
    "ls_links",
    "remove_tree",
    "safe_extract",
    "sanitize_tree",
]

DEFAULT_MAX_BYTES = 10 * 1024**3  # a fetch, or a results folder, holds at most this many bytes
DEFAULT_MAX_ENTRIES = 100_000  # ... and at most this many files, folders and links
_COPY = 1024 * 1024  # bytes per read: of kubo's answers, and of a file being added
_LS_BATCH = 128  # folders listed per ls call during the pre-download walk
_HEADER_ALLOWANCE = 64 * 1024  # tar stream bytes allowed per entry beyond its data
_ERROR_BODY = 64 * 1024  # bytes of an error answer read for kubo's message

_UNIXFS_DIR, _UNIXFS_FILE, _UNIXFS_SYMLINK = 1, 2, 4  # kubo's ls types


@dataclass
class TreeSize:
    """What a CID holds: ``entries`` (files, folders and links, the root included) and ``bytes``."""

    entries: int = 0
    bytes: int = 0


class Walk:
    """The pre-download walk of a CID's DAG, without I/O (this module's client and the CLI's
    blocking one, ``bacq.kubo``, feed it kubo's answers): ``start`` with the root's ``files/stat``,
    then ``feed`` the ``ls`` links of each ``next_batch`` of folders until it is empty; ``size``
    is what the DAG holds. Raises StorageError as soon as it holds more than ``max_entries``
    entries or ``max_bytes`` bytes, an unsafe name, or something else than files, folders and
    symlinks."""

    def __init__(self, cid: str, max_bytes: int, max_entries: int) -> None:
        self.cid = cid
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.size = TreeSize(entries=1)
        self._pending: list[str] = []

    def start(self, info: dict[str, Any]) -> None:
        kind = info.get("Type")
        if kind == "file":
            self.size.bytes = _nonneg(info.get("Size"), self.cid)
            _check_limits(self.cid, self.size, self.max_bytes, self.max_entries)
        elif kind == "directory":
            self._pending = [self.cid]
        else:
            raise StorageError(f"{self.cid} is a {kind}, not a file or a folder; nothing to fetch")

    def next_batch(self) -> list[str]:
        batch, self._pending = self._pending[:_LS_BATCH], self._pending[_LS_BATCH:]
        return batch

    def feed(self, links: list[dict[str, Any]]) -> None:
        cid, size = self.cid, self.size
        for entry in links:
            size.entries += 1
            name, kind_code = entry.get("Name", ""), entry.get("Type")
            _check_name(cid, name)
            if kind_code == _UNIXFS_DIR:
                self._pending.append(str(entry.get("Hash", "")))
            elif kind_code == _UNIXFS_FILE:
                size.bytes += _nonneg(entry.get("Size"), cid)
            elif kind_code != _UNIXFS_SYMLINK:
                raise StorageError(
                    f"{cid} holds {name!r}, which is not a UnixFS file, folder or symlink"
                )
            _check_limits(cid, size, self.max_bytes, self.max_entries)


def ls_links(line: bytes, root: str) -> list[dict[str, Any]]:
    """The links of one line of kubo's streamed ``ls`` answer."""
    links: list[dict[str, Any]] = []
    try:
        for obj in json.loads(line).get("Objects") or []:
            links.extend(obj.get("Links") or [])
    except (ValueError, AttributeError, TypeError):
        raise StorageError(f"a listing of {root} is not JSON: {line[:80]!r}") from None
    return links


def _kubo_message(body: bytes, status: int) -> str:
    message = body.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError, AttributeError):
        message = str(json.loads(body).get("Message", message)).strip()
    return message[:500] or f"HTTP {status}"


# -- limits ---------------------------------------------------------------------------------------
def _nonneg(value: Any, cid: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise StorageError(f"kubo gave no size for an entry of {cid}") from None
    if number < 0:
        raise StorageError(f"an entry of {cid} claims a negative size")
    return number


def _check_name(cid: str, name: Any) -> None:
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise StorageError(
            f"refused an unsafe archive entry: {cid} holds an entry named {str(name)[:80]!r}"
        )


def _check_limits(cid: str, size: TreeSize, max_bytes: int, max_entries: int) -> None:
    if size.entries > max_entries:
        raise StorageError(
            f"{cid} holds more than {max_entries} entries (files, folders and links), the limit; "
            "nothing was downloaded"
        )
    if size.bytes > max_bytes:
        raise StorageError(
            f"{cid} holds at least {_human(size.bytes)} ({size.bytes} bytes), more than the limit "
            f"of {_human(max_bytes)} ({max_bytes} bytes); nothing was downloaded"
        )


def _human(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{count} B"
        value /= 1024
    return f"{count} B"  # not reached


# -- the add form ---------------------------------------------------------------------------------
@dataclass
class _Part:
    head: bytes
    path: Path | None = None
    size: int = 0


class _AddForm:
    """kubo's add form for a file or a folder, as the Go client writes it: depth first, entries
    sorted by name, names query-escaped; file contents are streamed from their files."""

    def __init__(self, parts: list[_Part], boundary: str, root_name: str) -> None:
        self.parts = parts
        self.boundary = boundary
        self.root_name = root_name
        self.tail = f"--{boundary}--\r\n".encode()
        self.length = sum(len(p.head) + p.size + 2 for p in parts) + len(self.tail)
        self.failure: StorageError | None = None  # why the form could not be sent, if it failed

    @classmethod
    def build(cls, root: Path) -> _AddForm:
        boundary = secrets.token_hex(16)
        parts: list[_Part] = []

        def head(name: str, content_type: str) -> bytes:
            return (
                f"--{boundary}\r\n"
                f'Content-Disposition: form-data; name="file"; filename="{quote_plus(name)}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n"
            ).encode()

        try:
            st = root.lstat()
        except OSError as exc:
            raise StorageError(f"cannot add {root}: {exc}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise StorageError(f"cannot add {root}: not a regular file or a folder")
        # depth first, as a stack of (full path, form name, mode, size); symlinks and special
        # files are left out
        root_name = root.name or root.resolve().name or "root"  # "." or "/"
        stack: list[tuple[Path, str, int, int]] = [(root, root_name, st.st_mode, st.st_size)]
        while stack:
            full, name, mode, size = stack.pop()
            if stat.S_ISREG(mode):
                parts.append(_Part(head(name, "application/octet-stream"), full, size))
                continue
            if not stat.S_ISDIR(mode):
                continue
            parts.append(_Part(head(name, "application/x-directory")))
            try:
                with os.scandir(full) as listing:
                    found = sorted(listing, key=lambda e: e.name)
                children = [(e, e.stat(follow_symlinks=False)) for e in found]
            except OSError as exc:
                raise StorageError(f"cannot add {full}: {exc}") from None
            for entry, info in reversed(children):
                stack.append((Path(entry.path), f"{name}/{entry.name}", info.st_mode, info.st_size))
        return cls(parts, boundary, root_name)

    def payload(self) -> Any:
        """The form as an aiohttp payload of known length (sent with a Content-Length)."""
        from bacq.storage import _form_payload_class  # Storage's (aiohttp's) sending side

        return _form_payload_class()(self)

    async def write(self, writer: Any) -> None:
        """Send the form on aiohttp's ``writer``; file contents are read in a thread, _COPY
        bytes at a time (aiohttp offers no sendfile(2) for a request body)."""
        try:
            for part in self.parts:
                await writer.write(part.head)
                if part.path is not None and part.size:
                    await self._write_file(writer, part.path, part.size)
                await writer.write(b"\r\n")
            await writer.write(self.tail)
        except StorageError as exc:
            self.failure = exc
            raise

    @staticmethod
    async def _write_file(writer: Any, path: Path, size: int) -> None:
        import asyncio  # only Storage (asyncio) sends a form this way; bacq.kubo uses sendfile

        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from None
        try:
            left = size
            while left:
                try:
                    data = await asyncio.to_thread(handle.read, min(left, _COPY))
                except OSError as exc:
                    raise StorageError(f"cannot read {path}: {exc}") from None
                if not data:
                    raise StorageError(f"{path} changed while it was being added")
                left -= len(data)
                await writer.write(data)
        finally:
            handle.close()


# -- extraction -----------------------------------------------------------------------------------
@dataclass
class _Limits:
    what: str
    max_bytes: int
    max_entries: int
    root: str | None = None  # every entry must be this name or under it
    shown: str = ""  # the destination named in messages (the extraction folder by default)


def _refuse(reason: str, shown: str) -> StorageError:
    return StorageError(
        f"refused an unsafe archive entry: {reason}; nothing outside {shown} was written"
    )


def _extract_stream(fileobj: Any, dest: Path, limits: _Limits) -> TreeSize:
    """Extract the tar stream ``fileobj`` into the existing, empty folder ``dest``.

    Only folders, regular files and symlinks are written. A name must be relative, without
    ``.``/``..``/empty parts; its parents are folders this extraction made (so nothing is
    written through a link); nothing is written over an existing entry. A symlink may only climb
    (leading ``..``) within the tree, then descend: it cannot point out, whatever other links do.
    """
    kinds: dict[str, str] = {}
    size = TreeSize()
    shown = limits.shown or str(dest)  # the folder named in messages
    reader = _TarReader(fileobj)
    try:
        for member in reader.members():
            size.entries += 1
            if size.entries > limits.max_entries:
                raise StorageError(
                    f"{limits.what} holds more than {limits.max_entries} entries (files, "
                    "folders and links), the limit; the download was stopped"
                )
            name = member.name.rstrip("/") if member.isdir() else member.name
            parts = _member_parts(name, limits, shown)
            if name in kinds:
                raise _refuse(f"{name!r} appears twice", shown)
            parent_depth = _ensure_parents(parts, kinds, dest, shown)
            full = os.path.join(dest, *parts)
            if member.type == tarfile.DIRTYPE:
                _write(os.mkdir, full, 0o755)
                kinds[name] = "dir"
            elif member.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                size.bytes += member.size
                if size.bytes > limits.max_bytes:
                    raise StorageError(
                        f"{limits.what} holds more than {_human(limits.max_bytes)} "
                        f"({limits.max_bytes} bytes), the limit; the download was stopped"
                    )
                _write_file(reader, member, full, shown)
                kinds[name] = "file"
            elif member.type == tarfile.SYMTYPE:
                depth = parent_depth - (1 if limits.root is not None else 0)
                if limits.root is not None and len(parts) == 1:
                    raise _refuse(f"{name!r} is a symlink, not a file or a folder", shown)
                _check_link(name, member.linkname, depth, shown)
                _write(_symlinker(member.linkname), full, 0)
                kinds[name] = "link"
            else:
                raise _refuse(f"{name!r} is a {_kind(member)}", shown)
    except _Truncated as exc:
        raise StorageError(
            f"the archive of {limits.what} ends early ({exc}): its sender stopped (kubo stops when "
            "a block cannot be read or a file's data does not match the size it claims); refused"
        ) from None
    except tarfile.TarError as exc:
        raise StorageError(f"the archive of {limits.what} is corrupt: {exc}") from None
    if limits.root is not None and limits.root not in kinds:
        raise StorageError(
            f"the archive kubo returned for {limits.what} has no entry {limits.root}"
        )
    return size


def _move_into_place(produced: Path, target: Path) -> None:
    if target.exists():  # an empty folder (checked by fetch)
        target.rmdir()
    os.replace(produced, target)


def _member_parts(name: str, limits: _Limits, shown: str) -> list[str]:
    if not name or name.startswith("/") or "\x00" in name:
        raise _refuse(f"{name!r} is an absolute or empty path", shown)
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise _refuse(f"{name!r} has an empty, '.' or '..' part", shown)
    if limits.root is not None and parts[0] != limits.root:
        raise _refuse(f"{name!r} is not under {limits.root}", shown)
    return parts


def _ensure_parents(parts: list[str], kinds: dict[str, str], dest: Path, shown: str) -> int:
    """Make the member's missing parent folders; refuse a parent that is a file or a link.
    Returns the member's depth (number of parent folders below ``dest``)."""
    for depth in range(1, len(parts)):
        parent = "/".join(parts[:depth])
        kind = kinds.get(parent)
        if kind is None:
            _write(os.mkdir, os.path.join(dest, *parts[:depth]), 0o755)
            kinds[parent] = "dir"
        elif kind != "dir":
            raise _refuse(f"{'/'.join(parts)!r} lies under {parent!r}, which is a {kind}", shown)
    return len(parts) - 1


def _check_link(name: str, target: str, depth: int, shown: str) -> None:
    if not target or target.startswith("/") or "\x00" in target:
        raise _refuse(f"symlink {name!r} points to {target!r}, an absolute or empty path", shown)
    climbing, ups = True, 0
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not climbing:
                raise _refuse(f"symlink {name!r} points to {target!r} ('..' after a name)", shown)
            ups += 1
        else:
            climbing = False
    if ups > depth:
        raise _refuse(f"symlink {name!r} points to {target!r}, out of the tree", shown)


def _symlinker(target: str) -> Callable[[str, int], None]:
    def make(full: str, _mode: int) -> None:
        os.symlink(target, full)

    return make


def _write(make: Callable[[str, int], Any], full: str, mode: int) -> None:
    try:
        make(full, mode)
    except FileExistsError:
        raise StorageError(f"refused an unsafe archive entry: {full} exists already") from None
    except OSError as exc:
        raise StorageError(f"cannot write {full}: {exc}") from None


def _write_file(reader: _TarReader, member: tarfile.TarInfo, full: str, shown: str) -> None:
    mode = 0o755 if member.mode & 0o100 else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(full, flags, mode)
    except FileExistsError:
        raise _refuse(f"{member.name!r} exists already", shown) from None
    except OSError as exc:
        raise StorageError(f"cannot write {full}: {exc}") from None
    try:
        for piece in reader.data(member.size):
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view) :]
    except OSError as exc:
        raise StorageError(f"cannot write {full}: {exc}") from None
    finally:
        os.close(fd)


class _Truncated(tarfile.ReadError):
    """The tar stream ended before the archive did."""


class _TarReader:
    """Reads a tar stream from anything with ``read(n)`` (at most n bytes, b"" at its end):
    ustar headers parsed by tarfile.TarInfo.frombuf, pax and GNU long names applied, data handed
    over as it arrives (no copy through tarfile's stream buffer)."""

    _MAX_META = 1024 * 1024  # a pax header or a GNU long name larger than this is refused

    def __init__(self, source: Any) -> None:
        self._source = source
        self._buf = b""
        self._pos = 0
        self._owed = 0  # bytes of the current member (data and padding) not consumed yet

    def _fill(self) -> bool:
        data = self._source.read(_COPY)
        if not data:
            return False
        rest = self._buf[self._pos :]
        self._buf = rest + data if rest else data
        self._pos = 0
        return True

    def _take(self, count: int) -> bytes:
        while len(self._buf) - self._pos < count:
            if not self._fill():
                raise _Truncated("unexpected end of the archive")
        data = self._buf[self._pos : self._pos + count]
        self._pos += count
        return data

    def data(self, size: int) -> Any:
        """The next ``size`` bytes of data, in pieces (an iterator); then the padding is skipped."""
        left = size
        while left:
            if self._pos >= len(self._buf) and not self._fill():
                raise _Truncated("the archive ends in the middle of a file")
            piece = memoryview(self._buf)[self._pos : self._pos + left]
            self._pos += len(piece)
            left -= len(piece)
            self._owed -= len(piece)
            yield piece

    def _skip_owed(self) -> None:
        while self._owed:
            if self._pos >= len(self._buf) and not self._fill():
                raise _Truncated("unexpected end of the archive")
            step = min(self._owed, len(self._buf) - self._pos)
            self._pos += step
            self._owed -= step

    def members(self) -> Any:
        """The archive's entries, one TarInfo each; the data of each must be read (``data``) or
        is skipped before the next header is read."""
        pax: dict[str, str] = {}
        long_name: str | None = None
        long_link: str | None = None
        while True:
            self._skip_owed()
            block = self._take(tarfile.BLOCKSIZE)
            if block == tarfile.NUL * tarfile.BLOCKSIZE:
                return  # the end-of-archive marker (what follows is drained by the caller)
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            padded = -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            meta = (
                tarfile.XHDTYPE,
                tarfile.XGLTYPE,
                tarfile.GNUTYPE_LONGNAME,
                tarfile.GNUTYPE_LONGLINK,
            )
            if info.type in meta:
                if info.size > self._MAX_META:
                    raise tarfile.HeaderError(f"a header of {info.size} bytes")
                payload = self._take(padded)[: info.size]
                if info.type == tarfile.XHDTYPE:
                    pax.update(_pax_records(payload))
                elif info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = _nul_terminated(payload)
                elif info.type == tarfile.GNUTYPE_LONGLINK:
                    long_link = _nul_terminated(payload)
                continue  # a global pax header (XGLTYPE) holds nothing bacq uses
            if long_name is not None:
                info.name = long_name
            if long_link is not None:
                info.linkname = long_link
            if "path" in pax:
                info.name = pax["path"]
            if "linkpath" in pax:
                info.linkname = pax["linkpath"]
            if "size" in pax:
                try:
                    info.size = int(pax["size"])
                except ValueError:
                    raise tarfile.HeaderError(f"pax size {pax['size'][:20]!r}") from None
                padded = -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if info.size < 0:
                raise tarfile.HeaderError("a negative size")
            if info.type in _NO_DATA:  # as tarfile does: their size field means nothing
                padded = 0
            pax, long_name, long_link = {}, None, None
            self._owed = padded
            yield info


_NO_DATA = (
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.FIFOTYPE,
)


def _nul_terminated(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(payload: bytes) -> dict[str, str]:
    """``LENGTH KEY=VALUE\\n`` records (POSIX pax extended header)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        space = payload.find(b" ", pos)
        try:
            length = int(payload[pos:space])
        except ValueError:
            raise tarfile.HeaderError("a malformed pax record") from None
        record = payload[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise tarfile.HeaderError("a malformed pax record")
        key, value = record[:-1].split(b"=", 1)
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _kind(member: tarfile.TarInfo) -> str:
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    return f"entry of tar type {member.type!r}"


def safe_extract(
    archive: Path,
    dest: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> TreeSize:
    """Extract the tar file ``archive`` into the folder ``dest`` with the rules of a fetch:
    StorageError for any entry that could land outside it or is not a file, folder or symlink."""
    with Path(archive).open("rb") as handle:
        return _extract_stream(handle, Path(dest), _Limits(str(archive), max_bytes, max_entries))


# -- results --------------------------------------------------------------------------------------
def sanitize_tree(
    root: Path, *, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES
) -> list[str]:
    """Check a job's output folder before it is added to IPFS; return what was removed.

    Regular files and folders stay; anything else (a symlink written by the job could make the
    worker read a host file, a FIFO would block the add forever) is removed and named in the
    returned list. Fails closed: an entry that cannot be listed, stat'ed or removed raises
    StorageError; more than ``max_entries`` entries or ``max_bytes`` bytes in regular files (the
    stdout and stderr files count) raises ResultsTooLarge.
    """
    root = Path(root)
    removed: list[str] = []
    entries = total = 0
    pending = [root]
    while pending:
        here = pending.pop()
        try:
            listing = os.scandir(here)
        except OSError as exc:
            raise StorageError(f"cannot list {_rel(here, root)} in the results: {exc}") from None
        with listing:
            while True:
                try:
                    entry = next(listing, None)
                except OSError as exc:
                    raise StorageError(
                        f"cannot list {_rel(here, root)} in the results: {exc}"
                    ) from None
                if entry is None:
                    break
                entries += 1
                if entries > max_entries:
                    raise ResultsTooLarge(
                        f"the results hold more than {max_entries} entries (files and folders), "
                        "the worker's limit; write fewer, larger files"
                    )
                full = Path(entry.path)
                try:
                    mode = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    raise StorageError(
                        f"cannot stat {_rel(full, root)} in the results: {exc}"
                    ) from None
                if stat.S_ISDIR(mode.st_mode):
                    pending.append(full)
                elif stat.S_ISREG(mode.st_mode):
                    total += mode.st_size
                    if total > max_bytes:
                        raise ResultsTooLarge(
                            f"the results (output folders, stdout and stderr) hold more than "
                            f"{_human(max_bytes)} ({max_bytes} bytes), the worker's limit"
                        )
                else:
                    try:
                        full.unlink()
                    except OSError as exc:
                        raise StorageError(
                            f"cannot remove {_rel(full, root)} (not a regular file or folder) "
                            f"from the results: {exc}"
                        ) from None
                    removed.append(_rel(full, root))
    return removed


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path != root else "."


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
