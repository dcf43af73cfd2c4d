"""IPFS storage through a kubo node's RPC API (aioipfs): add a folder, fetch a CID safely, pin.

Touches the kubo node at the given multiaddr (through aioipfs's client and its aiohttp session)
and the local paths it is handed, nothing else. Every call has a deadline of ours (aioipfs's own
are an hour). CIDs are v1 with raw leaves and no file metadata, so identical content gives an
identical CID on every worker; ``add(..., only_hash=True)`` computes that CID without storing a
block (commit before reveal).

Whatever a fetch brings in is bounded and checked: before the download, the DAG is walked (``ls``,
which reads folder blocks and each entry's first block only) and its entry count and total size are
held against the caller's limits; during the download, kubo's tar stream is read as it arrives (our
reader; headers parsed by tarfile.TarInfo.frombuf) and extracted entry by entry by our own strict
extractor (no absolute paths, no ``..``, no entry written through a link or over another, no hard
links, devices or FIFOs, symlinks that stay inside, sizes counted as they are written), and what it
wrote must match the walk. ``sanitize_tree`` checks a job's output folder before it is added:
it fails closed and bounds the entry count and the bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import secrets
import shutil
import stat
import tarfile
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote_plus

from bacq.errors import InputUnavailable, IpfsUnavailable, ResultsTooLarge, StorageError

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "DEFAULT_IPFS_API",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "Storage",
    "TreeSize",
    "preload",
    "safe_extract",
    "sanitize_tree",
]

DEFAULT_IPFS_API = "/ip4/127.0.0.1/tcp/5001"
DEFAULT_MAX_BYTES = 10 * 1024**3  # a fetch, or a results folder, holds at most this many bytes
DEFAULT_MAX_ENTRIES = 100_000  # ... and at most this many files, folders and links
_COPY = 1024 * 1024  # bytes per read: of kubo's answers, and of a file being added
_LS_BATCH = 128  # folders listed per ls call during the pre-download walk
_HEADER_ALLOWANCE = 64 * 1024  # tar stream bytes allowed per entry beyond its data
_ERROR_BODY = 64 * 1024  # bytes of an error answer read for kubo's message
_GRACE = 30.0  # seconds a cancelled fetch waits for its extraction thread to let go
T = TypeVar("T")

_UNIXFS_DIR, _UNIXFS_FILE, _UNIXFS_SYMLINK = 1, 2, 4  # kubo's ls types


def _aioipfs() -> Any:
    import aioipfs  # imported on first use: with aiohttp, it is a large part of the CLI's start-up

    return aioipfs


async def preload() -> None:
    """Import the IPFS client in a thread, e.g. while a job runs, so that ``connect`` is quick."""
    await asyncio.to_thread(_aioipfs)


@dataclass
class TreeSize:
    """What a CID holds: ``entries`` (files, folders and links, the root included) and ``bytes``."""

    entries: int = 0
    bytes: int = 0


class Storage:
    """A kubo node. Build it with ``await Storage.connect(maddr)`` inside a running loop."""

    def __init__(self, client: Any, maddr: str, timeout: float) -> None:
        self._client = client  # an aioipfs.AsyncIPFS
        self.maddr = maddr
        self.timeout = timeout

    @classmethod
    async def connect(cls, maddr: str, *, timeout: float = 60.0) -> Storage:
        aioipfs = await asyncio.to_thread(_aioipfs)
        try:
            client = aioipfs.AsyncIPFS(maddr=maddr)
        except aioipfs.InvalidNodeAddressError as exc:
            raise IpfsUnavailable(
                f"BACQ_IPFS_API {maddr!r} is not a kubo RPC multiaddr ({exc}); "
                "write it like /ip4/127.0.0.1/tcp/5001"
            ) from None
        # aioipfs's session ends any request after 30 minutes (10 without a byte): ours has no
        # such limit, every call of ours runs within its own deadline (a large fetch may be long)
        first, client.session = client.session, client.get_session(None, None)
        await first.close()
        storage = cls(client, maddr, timeout)
        try:
            # not aioipfs's core.id(): it answers None for a refused connection, without the cause
            info = await storage._json("id", [], "asking kubo for its id", timeout=10)
            if not isinstance(info, dict) or "ID" not in info:
                raise StorageError("its answer to id has no ID")
        except StorageError as exc:
            await storage.close()
            reason = exc.cause if isinstance(exc, _Unreachable) else str(exc)
            raise IpfsUnavailable(
                f"no kubo RPC API answers at {maddr} ({reason}); start one with "
                "`bacq devstack` or set BACQ_IPFS_API / --ipfs to a running node"
            ) from None
        return storage

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()

    # -- plumbing ---------------------------------------------------------------------------------
    async def _within(self, what: str, deadline: float | None, work: Any) -> Any:
        """Await ``work`` within ``deadline`` (the storage's timeout by default)."""
        limit = deadline if deadline is not None else self.timeout
        try:
            async with asyncio.timeout(limit):
                return await work
        except TimeoutError:
            raise StorageError(f"{what} took longer than {limit:g}s") from None

    @contextlib.asynccontextmanager
    async def _post(
        self,
        endpoint: str,
        params: list[tuple[str, str]],
        what: str,
        *,
        ok_only: bool = True,
        **kwargs: Any,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST to kubo's RPC ``endpoint`` on aioipfs's session; a non-200 answer raises
        StorageError with kubo's message (unless ``ok_only`` is False), and so do aiohttp's
        errors, from the request or from reading the answer inside the block."""
        import aiohttp

        url = self._client.core.url(endpoint)
        try:
            async with self._client.session.post(
                url, params=params, auth=self._client.auth, **kwargs
            ) as response:
                if ok_only and response.status != 200:
                    body = await response.content.read(_ERROR_BODY)
                    raise StorageError(f"{what}: {_kubo_message(body, response.status)}")
                yield response
        except aiohttp.ClientError as exc:
            raise _Unreachable(what, self.maddr, _client_error(exc)) from None

    async def _json(
        self,
        endpoint: str,
        params: list[tuple[str, str]],
        what: str,
        *,
        timeout: float | None = None,
        limit: int = 1 << 20,
    ) -> Any:
        async def work() -> Any:
            async with self._post(endpoint, params, what) as response:
                body = await _read_at_most(response, limit, what)
            try:
                return json.loads(body)
            except ValueError:
                raise StorageError(f"{what}: kubo's answer is not JSON: {body[:80]!r}") from None

        return await self._within(what, timeout, work())

    async def _api(self, what: str, call: Any, *, timeout: float | None = None) -> Any:
        """Await a call of aioipfs's own API within the deadline; its errors become StorageError.
        (aioipfs answers None when the connection fails: that is an error too.)"""
        import aiohttp

        aioipfs = _aioipfs()
        try:
            result = await self._within(what, timeout, call)
        except aioipfs.APIError as exc:
            raise StorageError(f"{what}: {exc.message or f'HTTP {exc.http_status}'}") from None
        except (aioipfs.UnknownAPIError, aioipfs.IPFSConnectionError, aiohttp.ClientError) as exc:
            raise StorageError(
                f"{what} failed: cannot talk to kubo at {self.maddr} ({exc or type(exc).__name__})"
            ) from None
        if result is None:
            raise StorageError(f"{what} failed: no answer from kubo at {self.maddr}")
        return result

    # -- small calls ------------------------------------------------------------------------------
    async def node_id(self) -> dict[str, Any]:
        info: dict[str, Any] = await self._api("asking kubo for its id", self._client.core.id())
        return info

    async def version(self) -> dict[str, Any]:
        info: dict[str, Any] = await self._api(
            "asking kubo for its version", self._client.core.version()
        )
        return info

    async def pin(self, cid: str) -> None:
        async def work() -> bool:
            async for _ in self._client.pin.add(cid):
                pass
            return True

        await self._api(f"pinning {cid}", work())

    async def stat(self, cid: str, *, timeout: float | None = None) -> dict[str, Any]:
        """kubo's ``files/stat`` of ``/ipfs/CID``: Type (file, directory, symlink), Size, ..."""
        info = await self._api(
            f"kubo cannot stat {cid}", self._client.files.stat(f"/ipfs/{cid}"), timeout=timeout
        )
        if not isinstance(info, dict):
            raise StorageError(f"kubo cannot stat {cid}: its answer is not a JSON object")
        return info

    async def has_block(self, cid: str) -> bool:
        """Whether the node holds the block ``cid`` itself (asks nobody else: ``offline``)."""
        what = f"looking for block {cid}"

        async def work() -> bool:
            params = [("arg", cid), ("offline", "true")]
            async with self._post("block/stat", params, what, ok_only=False) as response:
                await _read_at_most(response, _ERROR_BODY, what)
                return response.status == 200

        found: bool = await self._within(what, None, work())
        return found

    async def read_tail(self, path: str, *, limit: int = 64 * 1024) -> bytes:
        """The last ``limit`` bytes of the file at ``path`` (``CID/stdout``), for a quick look."""
        info = await self._json(
            "files/stat", [("arg", f"/ipfs/{path}")], f"kubo cannot stat {path}"
        )
        size = int(info.get("Size", 0)) if isinstance(info, dict) else 0
        params = [("arg", path), ("offset", str(max(0, size - limit))), ("length", str(limit))]
        what = f"reading {path} from IPFS"

        async def work() -> bytes:
            async with self._post("cat", params, f"kubo cannot read {path}") as response:
                return await _read_at_most(response, limit, what)

        data: bytes = await self._within(what, None, work())
        return data

    # -- add --------------------------------------------------------------------------------------
    async def add(self, path: Path, *, pin: bool = True, only_hash: bool = False) -> str:
        """Add a file or a folder (recursively, dotfiles included) and return its CIDv1.

        ``only_hash``: compute the very CID a normal add gives, without storing or pinning a
        block (kubo's ``add --only-hash``). Symlinks and special files in a folder are left out.
        """
        path = Path(path)
        if not path.exists():
            # aioipfs skips missing paths without a word; say it instead
            raise StorageError(f"cannot add {path}: no such file or directory")
        form = await asyncio.to_thread(_AddForm.build, path)
        params = {"cid-version": "1", "recursive": "true"}
        if only_hash:
            params.update({"only-hash": "true", "pin": "false"})
        else:
            params["pin"] = "true" if pin else "false"
        what = f"hashing {path}" if only_hash else f"adding {path} to IPFS"

        async def work() -> str:
            root = ""
            # the form is ours, not aioipfs's add(): with aiohttp >= 3.12 its payloads for a lone
            # file fail, and a folder holding an empty file and a subfolder makes kubo wait
            # forever for the rest of the form
            async for entry in self._client.core.add_generic(form.payload(), params=params):
                if isinstance(entry, dict) and entry.get("Name") == form.root_name:
                    root = str(entry.get("Hash", ""))
            return root

        try:
            root: str = await self._api(what, work())
        except StorageError:
            if form.failure is not None:
                raise form.failure from None  # the cause (a file that changed), not its effect
            raise
        if not root:
            raise StorageError(f"kubo did not return a CID for {path}")
        return root

    # -- fetch ------------------------------------------------------------------------------------
    async def measure(
        self,
        cid: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        timeout: float | None = None,
    ) -> TreeSize:
        """Walk ``cid``'s DAG (folders and each entry's first block, not the data) and return its
        size; StorageError as soon as it holds more than ``max_entries`` entries or ``max_bytes``.
        """
        deadline = timeout if timeout is not None else self.timeout
        size: TreeSize = await self._within(
            f"measuring {cid}", deadline, self._measure(cid, max_bytes, max_entries, deadline)
        )
        return size

    async def _measure(
        self, cid: str, max_bytes: int, max_entries: int, timeout: float
    ) -> TreeSize:
        info = await self.stat(cid, timeout=timeout)
        kind = info.get("Type")
        size = TreeSize(entries=1)
        if kind == "file":
            size.bytes = _nonneg(info.get("Size"), cid)
            _check_limits(cid, size, max_bytes, max_entries)
            return size
        if kind != "directory":
            raise StorageError(f"{cid} is a {kind}, not a file or a folder; nothing to fetch")
        pending = [cid]
        while pending:
            batch, pending = pending[:_LS_BATCH], pending[_LS_BATCH:]
            for entry in await self._ls(batch, cid, timeout):
                size.entries += 1
                name, kind_code = entry.get("Name", ""), entry.get("Type")
                _check_name(cid, name)
                if kind_code == _UNIXFS_DIR:
                    pending.append(str(entry.get("Hash", "")))
                elif kind_code == _UNIXFS_FILE:
                    size.bytes += _nonneg(entry.get("Size"), cid)
                elif kind_code != _UNIXFS_SYMLINK:
                    raise StorageError(
                        f"{cid} holds {name!r}, which is not a UnixFS file, folder or symlink"
                    )
                _check_limits(cid, size, max_bytes, max_entries)
        return size

    async def _ls(self, folders: list[str], root: str, timeout: float) -> list[dict[str, Any]]:
        """The links of ``folders`` (one ls call; aioipfs's core.ls takes one path, no options)."""
        params = [("arg", f"/ipfs/{folder}") for folder in folders]
        params += [("resolve-type", "true"), ("size", "true"), ("stream", "true")]
        what = f"kubo cannot list {root}"

        async def work() -> list[dict[str, Any]]:
            links: list[dict[str, Any]] = []
            async with self._post("ls", params, what) as response:
                async for line in _lines(response, what):
                    try:
                        for obj in json.loads(line).get("Objects") or []:
                            links.extend(obj.get("Links") or [])
                    except (ValueError, AttributeError, TypeError):
                        raise StorageError(
                            f"a listing of {root} is not JSON: {line[:80]!r}"
                        ) from None
                    if len(links) > DEFAULT_MAX_ENTRIES * 10:
                        raise StorageError(f"a listing of {root} is too long")
            return links

        listed: list[dict[str, Any]] = await self._within(f"listing {root}", timeout, work())
        return listed

    async def fetch(
        self,
        cid: str,
        target: Path,
        *,
        timeout: float | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> Path:
        """Materialise ``cid`` at ``target`` (a file or a folder), safely. Returns ``target``.

        ``target`` must not exist yet, or be an empty folder. The DAG is measured first and
        refused (StorageError naming the CID, what it holds and the limit) when it holds more than
        ``max_entries`` entries or ``max_bytes`` bytes; the download stops at the same limits
        should kubo's archive hold more than the walk found. ``timeout`` covers it all.
        """
        target = Path(target)
        if target.exists() and not (target.is_dir() and not any(target.iterdir())):
            raise StorageError(f"{target} already exists and is not empty; choose another path")
        target.parent.mkdir(parents=True, exist_ok=True)
        deadline = timeout if timeout is not None else self.timeout
        try:
            async with asyncio.timeout(deadline):
                await self._fetch(cid, target, deadline, max_bytes, max_entries)
        except TimeoutError:
            raise InputUnavailable(
                f"could not fetch {cid} from IPFS within {deadline:g}s: no reachable node has it "
                "(add it with `bacq ipfs add` on a node of this network)"
            ) from None
        return target

    async def _fetch(
        self, cid: str, target: Path, timeout: float, max_bytes: int, max_entries: int
    ) -> None:
        # the calls inside get the whole deadline: the one of fetch() ends them first
        expected = await self._measure(cid, max_bytes, max_entries, timeout)
        with tempfile.TemporaryDirectory(prefix=".bacq-fetch-", dir=target.parent) as tmp:
            staging = Path(tmp)
            limits = _Limits(cid, max_bytes, max_entries, root=cid, shown=str(target))
            raw_limit = max_bytes + (max_entries + 2) * _HEADER_ALLOWANCE
            params = [("arg", cid), ("archive", "true")]
            async with self._post(
                "get", params, f"kubo refused to get {cid}", read_bufsize=2 * _COPY
            ) as response:
                if early_error := response.headers.get("X-Stream-Error"):
                    raise StorageError(f"kubo cannot get {cid}: {early_error}")
                # aiohttp reads the answer on the loop; a thread of ours extracts it (blocking
                # file I/O off the loop), pulling it in pieces of up to _COPY bytes
                source = _LoopReader(response.content, asyncio.get_running_loop(), raw_limit, cid)
                got = await _in_thread(
                    "bacq-kubo-extract",
                    lambda: _extract_and_drain(source, staging, limits),
                    source.abort,
                )
            # kubo reports an error met while it writes the archive (a block it cannot read, a
            # file whose data is longer or shorter than it claims) in the X-Stream-Error trailer,
            # which aiohttp does not expose: such an archive stops early, which the reader refuses
            # ("ends early"), and one that lacks entries or bytes cannot match the walk
            if got != expected:
                raise StorageError(
                    f"the archive kubo sent for {cid} ({got.entries} entries, {got.bytes} bytes) "
                    f"does not match its DAG ({expected.entries} entries, {expected.bytes} "
                    "bytes); refused"
                )
            await asyncio.to_thread(_move_into_place, staging / cid, target)


# -- kubo's answers -------------------------------------------------------------------------------
async def _read_at_most(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    parts: list[bytes] = []
    got = 0
    while data := await response.content.read(_COPY):
        got += len(data)
        if got > limit:
            raise StorageError(f"{what}: kubo's answer is larger than the {limit} bytes expected")
        parts.append(data)
    return b"".join(parts)


async def _lines(
    response: aiohttp.ClientResponse, what: str, max_line: int = 1 << 20
) -> AsyncIterator[bytes]:
    """The body split at newlines (kubo's streamed JSON); a longer line fails the call."""
    pending = b""
    while data := await response.content.read(_COPY):
        pending += data
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line.strip():
                yield line
        if len(pending) > max_line:
            raise StorageError(f"{what}: a line of kubo's answer is over {max_line} bytes")
    if pending.strip():
        yield pending


class _Unreachable(StorageError):
    """The HTTP exchange with kubo failed (refused, reset, cut short)."""

    def __init__(self, what: str, maddr: str, cause: str) -> None:
        self.cause = cause
        super().__init__(f"{what} failed: cannot talk to kubo at {maddr} ({cause})")


def _kubo_message(body: bytes, status: int) -> str:
    message = body.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError, AttributeError):
        message = str(json.loads(body).get("Message", message)).strip()
    return message[:500] or f"HTTP {status}"


def _client_error(exc: BaseException) -> str:
    """aiohttp's error, shortly: the OS's reason for a refused connection, else its text."""
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, OSError) and os_error.errno:
        return os.strerror(os_error.errno)  # "Connection refused", not asyncio's wording
    return str(exc) or type(exc).__name__


class _LoopReader:
    """``read(n)`` for the extraction thread: the next piece of an aiohttp answer, read by the
    event loop (at most ``limit`` bytes in all). ``abort`` (on the loop) makes a waiting or a
    later read fail at once."""

    def __init__(
        self, content: aiohttp.StreamReader, loop: asyncio.AbstractEventLoop, limit: int, cid: str
    ) -> None:
        self._content = content
        self._loop = loop
        self._limit = limit
        self._cid = cid
        self._received = 0
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future[bytes] | None = None
        self._aborted = False

    def read(self, size: int) -> bytes:
        with self._lock:
            if self._aborted:
                raise _Aborted
            pending = asyncio.run_coroutine_threadsafe(self._content.read(size), self._loop)
            self._pending = pending
        try:
            data = pending.result()
        except concurrent.futures.CancelledError:
            raise _Aborted from None
        self._received += len(data)
        if self._received > self._limit:
            raise StorageError(
                f"kubo's archive of {self._cid} is larger than its DAG allows; the download was "
                "stopped"
            )
        return data

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            if self._pending is not None:
                self._pending.cancel()


class _Aborted(Exception):
    """The fetch was cancelled while its extraction thread waited for data."""


def _extract_and_drain(source: _LoopReader, staging: Path, limits: _Limits) -> TreeSize:
    got = _extract_stream(source, staging, limits)
    while source.read(_COPY):  # what follows the end-of-archive marker, up to the answer's end
        pass
    return got


async def _in_thread(name: str, work: Callable[[], T], abort: Callable[[], None]) -> T:
    """Run ``work`` in a thread of its own and return its result. If the awaiting task is
    cancelled (or its deadline passes), ``abort`` is called and the cancellation goes on once the
    thread has stopped (at most _GRACE seconds): nothing is written after this returns."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def target() -> None:
        try:
            outcome: tuple[bool, Any] = (True, work())
        except BaseException as exc:
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name=name, daemon=True).start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        abort()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(future), timeout=_GRACE)
        raise


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


@functools.cache
def _form_payload_class() -> type[Any]:
    """aiohttp's Payload for an _AddForm (made on first use: aiohttp is imported late)."""
    from aiohttp.payload import Payload

    class FormPayload(Payload):
        def __init__(self, form: _AddForm) -> None:
            super().__init__(form, content_type=f"multipart/form-data; boundary={form.boundary}")
            self._form = form
            self._size = form.length

        def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
            raise TypeError("an add form is streamed, not decoded")

        async def write(self, writer: Any) -> None:
            await self._form.write(writer)

        async def write_with_length(self, writer: Any, content_length: int | None) -> None:
            await self._form.write(writer)  # the length is the form's own

    return FormPayload


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
