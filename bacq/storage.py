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
it fails closed and bounds the entry count and the bytes. The walk, the limits, the add form and
the extractor live in ``bacq.unixfs`` (no asyncio there), shared with the CLI's blocking client
``bacq.kubo``; their public names are importable from here as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bacq.errors import InputUnavailable, IpfsUnavailable, StorageError
from bacq.unixfs import (  # the walk, limits, form and extraction (shared with bacq.kubo)
    _COPY,
    _ERROR_BODY,
    _HEADER_ALLOWANCE,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    TreeSize,
    Walk,
    _AddForm,
    _extract_stream,
    _kubo_message,
    _Limits,
    _move_into_place,
    ls_links,
    remove_tree,
    safe_extract,
    sanitize_tree,
)

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "DEFAULT_IPFS_API",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "Storage",
    "TreeSize",
    "Walk",
    "import_client",
    "ls_links",
    "remove_tree",
    "safe_extract",
    "sanitize_tree",
]

DEFAULT_IPFS_API = "/ip4/127.0.0.1/tcp/5001"
_GRACE = 30.0  # seconds a cancelled fetch waits for its extraction thread to let go
T = TypeVar("T")


def import_client() -> Any:
    """The ``aioipfs`` module, imported on the caller's thread (``Storage.connect`` does it)."""
    # imported on first use: with aiohttp, it is a large part of the CLI's start-up. Never in a
    # thread: two threads importing at once can deadlock in CPython 3.11's import locks (seen:
    # this import, which pulls setuptools' distutils, and docker's in another thread)
    import aioipfs

    return aioipfs


class Storage:
    """A kubo node. Build it with ``await Storage.connect(maddr)`` inside a running loop."""

    def __init__(self, client: Any, maddr: str, timeout: float) -> None:
        self._client = client  # an aioipfs.AsyncIPFS
        self.maddr = maddr
        self.timeout = timeout

    @classmethod
    async def connect(cls, maddr: str, *, timeout: float = 60.0) -> Storage:
        aioipfs = import_client()
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

        aioipfs = import_client()
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
        walk = Walk(cid, max_bytes, max_entries)
        walk.start(await self.stat(cid, timeout=timeout))
        while batch := walk.next_batch():
            walk.feed(await self._ls(batch, cid, timeout))
        return walk.size

    async def _ls(self, folders: list[str], root: str, timeout: float) -> list[dict[str, Any]]:
        """The links of ``folders`` (one ls call; aioipfs's core.ls takes one path, no options)."""
        params = [("arg", f"/ipfs/{folder}") for folder in folders]
        params += [("resolve-type", "true"), ("size", "true"), ("stream", "true")]
        what = f"kubo cannot list {root}"

        async def work() -> list[dict[str, Any]]:
            links: list[dict[str, Any]] = []
            async with self._post("ls", params, what) as response:
                async for line in _lines(response, what):
                    links.extend(ls_links(line, root))
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
