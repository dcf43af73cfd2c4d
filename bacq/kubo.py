"""A blocking kubo RPC client for the CLI's data path: ``bacq ipfs add`` and ``bacq get``.

The same operations as ``bacq.storage.Storage.add`` and ``Storage.fetch``, with the same form, the
same CIDs, the same pre-download walk and limits, and the same strict extractor (``bacq.unixfs``,
which both use), over the standard library's ``http.client`` instead of aioipfs, aiohttp and
asyncio, whose import alone took a third of a second of the CLI's time; file contents go to kubo
with ``sendfile(2)``. A command uses it when the kubo address is a plain TCP multiaddr
(``KuboHttp.for_maddr``); services keep ``Storage``.

Touches the kubo node at the given multiaddr and the local paths it is handed, nothing else.
Every call has a deadline: the sockets time out when it passes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from bacq.errors import IpfsUnavailable, StorageError
from bacq.unixfs import (
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
)

__all__ = ["KuboHttp"]

_MAX_LINE = 1 << 20  # bytes of one line of kubo's streamed JSON
_SEND_GRACE = 10.0  # seconds to wait for the thread sending an add form once kubo has answered


class _Expired(Exception):
    """The call's deadline passed."""


class KuboHttp:
    """A kubo node's RPC API at ``host:port`` (``for_maddr`` reads a multiaddr)."""

    def __init__(self, host: str, port: int, maddr: str, timeout: float = 60.0) -> None:
        self.host = host
        self.port = port
        self.maddr = maddr
        self.timeout = timeout

    @classmethod
    def for_maddr(cls, maddr: str, *, timeout: float = 60.0) -> KuboHttp | None:
        """The client for ``/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT``; None for another form (the
        caller then uses ``Storage``, which reports a bad address)."""
        parts = maddr.strip().split("/")
        if len(parts) != 5 or parts[0] or parts[3] != "tcp":
            return None
        if parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6") or not parts[2]:
            return None
        try:
            port = int(parts[4])
        except ValueError:
            return None
        if not 0 < port < 65536:
            return None
        return cls(parts[2], port, maddr, timeout)

    # -- plumbing ---------------------------------------------------------------------------------
    def _connect(self, deadline: float) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=_left(deadline))
        try:
            conn.connect()
        except TimeoutError:
            conn.close()
            raise _Expired from None
        except OSError as exc:
            conn.close()
            raise IpfsUnavailable(
                f"no kubo RPC API answers at {self.maddr} ({exc.strerror or exc}); start one "
                "with `bacq devstack` or set BACQ_IPFS_API / --ipfs to a running node"
            ) from None
        return conn

    def _post(
        self, endpoint: str, params: list[tuple[str, str]], what: str, deadline: float
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """POST with no body; the answer (200) and its connection (the caller closes it)."""
        conn = self._connect(deadline)
        try:
            conn.request("POST", f"/api/v0/{endpoint}?{urlencode(params)}")
            response = conn.getresponse()
            _check(response, what)
        except BaseException:
            conn.close()
            raise
        return conn, response

    def _json_lines(
        self, endpoint: str, params: list[tuple[str, str]], what: str, deadline: float
    ) -> list[bytes]:
        conn, response = self._post(endpoint, params, what, deadline)
        try:
            return _lines(response, what, deadline)
        finally:
            conn.close()

    def _json(
        self, endpoint: str, params: list[tuple[str, str]], what: str, deadline: float
    ) -> Any:
        lines = self._json_lines(endpoint, params, what, deadline)
        try:
            return json.loads(b"".join(lines))
        except ValueError:
            raise StorageError(f"{what}: kubo's answer is not JSON") from None

    # -- add --------------------------------------------------------------------------------------
    def add(self, path: Path, *, pin: bool = True) -> str:
        """Add a file or a folder (recursively, dotfiles included; symlinks and special files
        left out) and return its CIDv1: the CID ``Storage.add`` gives."""
        path = Path(path)
        if not path.exists():
            raise StorageError(f"cannot add {path}: no such file or directory")
        what = f"adding {path} to IPFS"
        deadline = time.monotonic() + self.timeout
        form = _AddForm.build(path)
        params = {"cid-version": "1", "recursive": "true", "pin": "true" if pin else "false"}
        try:
            root = self._send_form(form, params, what, deadline)
        except _Expired:
            raise StorageError(f"{what} took longer than {self.timeout:g}s") from None
        if not root:
            raise StorageError(f"kubo did not return a CID for {path}")
        return root

    def _send_form(self, form: _AddForm, params: dict[str, str], what: str, deadline: float) -> str:
        conn = self._connect(deadline)
        failure: list[BaseException] = []
        sender: threading.Thread | None = None
        try:
            conn.putrequest("POST", f"/api/v0/add?{urlencode(params)}", skip_accept_encoding=True)
            conn.putheader("Content-Type", f"multipart/form-data; boundary={form.boundary}")
            conn.putheader("Content-Length", str(form.length))
            conn.endheaders()
            sock = conn.sock
            if sock is None:
                raise StorageError(f"{what} failed: the connection to kubo at {self.maddr} closed")

            def send() -> None:
                try:
                    for part in form.parts:
                        sock.sendall(part.head)
                        if part.path is not None and part.size:
                            _send_file(sock, part.path, part.size)
                        sock.sendall(b"\r\n")
                    sock.sendall(form.tail)
                except BaseException as exc:
                    failure.append(exc)
                    # kubo waits for the rest of the form, and the answer for kubo: end both
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

            # the form goes out in a thread while this one reads kubo's answer as it comes (a
            # folder of many files: kubo answers each one while the form is still arriving)
            sender = threading.Thread(target=send, name="bacq-kubo-add", daemon=True)
            sender.start()
            try:
                response = conn.getresponse()
                _check(response, what)
                lines = _lines(response, what, deadline)
            except (OSError, http.client.HTTPException, StorageError):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # the sender stops at once
                sender.join(_SEND_GRACE)
                cause = next((f for f in failure if isinstance(f, StorageError)), None)
                if cause is not None:
                    raise cause from None  # the cause (a file that changed), not its effect
                raise
            sender.join(max(0.0, min(_SEND_GRACE, deadline - time.monotonic())))
            if failure:
                if isinstance(failure[0], StorageError):
                    raise failure[0]
                raise StorageError(f"{what} failed: {failure[0]}")
        except TimeoutError:
            raise _Expired from None
        except (OSError, http.client.HTTPException) as exc:
            raise StorageError(
                f"{what} failed: cannot talk to kubo at {self.maddr} ({exc})"
            ) from None
        finally:
            conn.close()
            if sender is not None:
                sender.join(_SEND_GRACE)
        root = ""
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                raise StorageError(f"{what}: kubo's answer is not JSON: {line[:80]!r}") from None
            if isinstance(entry, dict) and entry.get("Name") == form.root_name:
                root = str(entry.get("Hash", ""))
        return root

    def read_tail(self, path: str, *, limit: int = 64 * 1024) -> bytes:
        """The last ``limit`` bytes of the file at ``path`` (``CID/stdout``), as
        ``Storage.read_tail``."""
        deadline = time.monotonic() + self.timeout
        what = f"reading {path} from IPFS"
        try:
            info = self._json(
                "files/stat", [("arg", f"/ipfs/{path}")], f"kubo cannot stat {path}", deadline
            )
            size = int(info.get("Size", 0)) if isinstance(info, dict) else 0
            params = [
                ("arg", path),
                ("offset", str(max(0, size - limit))),
                ("length", str(limit)),
            ]
            conn, response = self._post("cat", params, f"kubo cannot read {path}", deadline)
            try:
                data = b""
                while True:
                    _timeout_socket(response, deadline)
                    chunk = response.read1(_COPY)
                    if not chunk:
                        return data
                    data += chunk
                    if len(data) > limit:
                        raise StorageError(
                            f"{what}: kubo's answer is larger than the {limit} bytes expected"
                        )
            finally:
                conn.close()
        except (_Expired, TimeoutError):
            raise StorageError(f"{what} took longer than {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise StorageError(f"{what} failed: {exc}") from None

    # -- fetch ------------------------------------------------------------------------------------
    def fetch(
        self,
        cid: str,
        target: Path,
        *,
        timeout: float | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> Path:
        """Materialise ``cid`` at ``target``, as ``Storage.fetch`` does: the same checks, limits,
        messages and extractor; ``timeout`` (default: the client's) covers it all."""
        target = Path(target)
        if target.exists() and not (target.is_dir() and not any(target.iterdir())):
            raise StorageError(f"{target} already exists and is not empty; choose another path")
        target.parent.mkdir(parents=True, exist_ok=True)
        limit = timeout if timeout is not None else self.timeout
        deadline = time.monotonic() + limit
        try:
            self._fetch(cid, target, deadline, max_bytes, max_entries)
        except _Expired:
            raise StorageError(
                f"could not fetch {cid} from IPFS within {limit:g}s: no reachable node has it "
                "(add it with `bacq ipfs add` on a node of this network)"
            ) from None
        return target

    def measure(
        self,
        cid: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        deadline: float,
    ) -> TreeSize:
        walk = Walk(cid, max_bytes, max_entries)
        info = self._json(
            "files/stat", [("arg", f"/ipfs/{cid}")], f"kubo cannot stat {cid}", deadline
        )
        if not isinstance(info, dict):
            raise StorageError(f"kubo cannot stat {cid}: its answer is not a JSON object")
        walk.start(info)
        while batch := walk.next_batch():
            params = [("arg", f"/ipfs/{folder}") for folder in batch]
            params += [("resolve-type", "true"), ("size", "true"), ("stream", "true")]
            links: list[dict[str, Any]] = []
            for line in self._json_lines("ls", params, f"kubo cannot list {cid}", deadline):
                links.extend(ls_links(line, cid))
                if len(links) > DEFAULT_MAX_ENTRIES * 10:
                    raise StorageError(f"a listing of {cid} is too long")
            walk.feed(links)
        return walk.size

    def _fetch(
        self, cid: str, target: Path, deadline: float, max_bytes: int, max_entries: int
    ) -> None:
        try:
            expected = self.measure(
                cid, max_bytes=max_bytes, max_entries=max_entries, deadline=deadline
            )
            with tempfile.TemporaryDirectory(prefix=".bacq-fetch-", dir=target.parent) as tmp:
                staging = Path(tmp)
                limits = _Limits(cid, max_bytes, max_entries, root=cid, shown=str(target))
                raw_limit = max_bytes + (max_entries + 2) * _HEADER_ALLOWANCE
                conn, response = self._post(
                    "get",
                    [("arg", cid), ("archive", "true")],
                    f"kubo refused to get {cid}",
                    deadline,
                )
                try:
                    if early_error := response.getheader("X-Stream-Error"):
                        raise StorageError(f"kubo cannot get {cid}: {early_error}")
                    source = _Reader(response, raw_limit, cid, deadline)
                    got = _extract_stream(source, staging, limits)
                    while source.read(_COPY):  # what follows the end-of-archive marker
                        pass
                finally:
                    conn.close()
                # as in Storage._fetch: an archive kubo cut short (an error in its trailer,
                # which http.client does not read either) cannot match the walk
                if got != expected:
                    raise StorageError(
                        f"the archive kubo sent for {cid} ({got.entries} entries, {got.bytes} "
                        f"bytes) does not match its DAG ({expected.entries} entries, "
                        f"{expected.bytes} bytes); refused"
                    )
                _move_into_place(staging / cid, target)
        except TimeoutError:
            raise _Expired from None
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, OSError) and exc.filename is not None:
                raise  # the local side (a folder that cannot be written): its own message
            raise StorageError(
                f"fetching {cid} failed: cannot talk to kubo at {self.maddr} ({exc})"
            ) from None


class _Reader:
    """``read(n)`` of kubo's answer for the extractor: at most ``limit`` bytes in all, each read
    within what is left of the deadline."""

    def __init__(
        self, response: http.client.HTTPResponse, limit: int, cid: str, deadline: float
    ) -> None:
        self._response = response
        self._limit = limit
        self._cid = cid
        self._deadline = deadline
        self._received = 0

    def read(self, size: int) -> bytes:
        _timeout_socket(self._response, self._deadline)
        data = self._response.read1(min(size, _COPY)) if size > 0 else b""
        self._received += len(data)
        if self._received > self._limit:
            raise StorageError(
                f"kubo's archive of {self._cid} is larger than its DAG allows; the download was "
                "stopped"
            )
        return data


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Expired
    return left


def _timeout_socket(response: http.client.HTTPResponse, deadline: float) -> None:
    """Make the answer's next read end when the deadline passes."""
    left = _left(deadline)
    sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(left)


def _check(response: http.client.HTTPResponse, what: str) -> None:
    if response.status != 200:
        body = response.read(_ERROR_BODY)
        raise StorageError(f"{what}: {_kubo_message(body, response.status)}")


def _lines(response: http.client.HTTPResponse, what: str, deadline: float) -> list[bytes]:
    """kubo's streamed JSON answer, a line each (at most _MAX_LINE bytes each, and
    DEFAULT_MAX_ENTRIES * 10 lines)."""
    lines: list[bytes] = []
    pending = b""
    while True:
        _timeout_socket(response, deadline)
        data = response.read1(_COPY)
        if not data:
            break
        pending += data
        *complete, pending = pending.split(b"\n")
        lines.extend(line for line in complete if line.strip())
        if len(pending) > _MAX_LINE:
            raise StorageError(f"{what}: a line of kubo's answer is over {_MAX_LINE} bytes")
        if len(lines) > DEFAULT_MAX_ENTRIES * 10:
            raise StorageError(f"{what}: kubo's answer is too long")
    if pending.strip():
        lines.append(pending)
    return lines


def _send_file(sock: Any, path: Path, size: int) -> None:
    """``size`` bytes of ``path`` to the socket (sendfile(2)); StorageError if the file is
    shorter now than when the form was built."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from None
    with handle:
        sent = sock.sendfile(handle, 0, size)
    if sent != size:
        raise StorageError(f"{path} changed while it was being added")
