"""A small HTTP/1.1 client for kubo's RPC API, for bacq.storage: one connection per call.

Why not aiohttp/aioipfs: they take most of a second to import (a CLI command pays it on every run),
they cannot send a file with sendfile(2), and they drop the ``X-Stream-Error`` trailer by which kubo
reports an error in the middle of a streamed answer (a truncated archive would look complete).

Every call runs in its own thread with blocking socket I/O (so a big transfer costs little Python
per byte and never blocks the event loop); the async wrapper ``run_call`` aborts the socket when
the awaiting task is cancelled or times out, and waits for the thread to let go before returning.
Touches: one TCP connection per call to the kubo node, and the files a caller hands over to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

__all__ = ["Call", "KuboError", "Response", "parse_maddr", "run_call"]

T = TypeVar("T")
_HEADER_LIMIT = 64 * 1024  # a longer status line, header or chunk-size line is refused
_HEADERS_MAX = 100
_RECEIVE = 1024 * 1024  # bytes per receive at most


class KuboError(Exception):
    """kubo answered with an error (``message`` is kubo's own), or the HTTP exchange broke."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.message = message
        self.status = status
        super().__init__(message)


def parse_maddr(maddr: str) -> tuple[str, int]:
    """``/ip4/127.0.0.1/tcp/5001`` (or ``/ip6/::1/...``, ``/dns/host/...``) → (host, port)."""
    parts = maddr.strip().split("/")
    if len(parts) < 5 or parts[0] != "" or parts[3] != "tcp":
        raise ValueError("expected /ip4/ADDRESS/tcp/PORT")
    if parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6") or not parts[2]:
        raise ValueError(f"unsupported address protocol {parts[1]!r}")
    if len(parts) > 5 and any(parts[5:]) and parts[5:] != ["http"]:
        raise ValueError(f"unsupported trailing protocols {'/'.join(parts[5:])!r}")
    try:
        port = int(parts[4])
    except ValueError:
        raise ValueError(f"port {parts[4]!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return parts[2], port


class Call:
    """One RPC: a socket that another thread may abort (cancellation, deadline)."""

    def __init__(self, host: str, port: int, io_timeout: float) -> None:
        self.host, self.port, self.io_timeout = host, port, io_timeout
        self.sock: socket.socket | None = None
        self.aborted = False

    def connect(self) -> socket.socket:
        if self.aborted:
            raise KuboError("aborted")
        sock = socket.create_connection((self.host, self.port), timeout=self.io_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        return self._connected(sock)

    def _connected(self, sock: socket.socket) -> socket.socket:
        if self.aborted:  # abort() ran between connect()'s first check and self.sock's assignment
            self.close()
            raise KuboError("aborted")
        return sock

    def abort(self) -> None:
        """Make every blocked read or write of this call fail at once (any thread)."""
        self.aborted = True
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def request_head(
        self,
        endpoint: str,
        params: list[tuple[str, str]] | None = None,
        *,
        content_type: str | None = None,
        content_length: int = 0,
    ) -> bytes:
        query = urlencode(params or [], quote_via=quote)
        target = f"/api/v0/{endpoint}" + (f"?{query}" if query else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        lines = [
            f"POST {target} HTTP/1.1",
            f"Host: {host}:{self.port}",
            "User-Agent: bacq",
            "Connection: close",
            f"Content-Length: {content_length}",
        ]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def post(
        self, endpoint: str, params: list[tuple[str, str]] | None = None, *, limit: int = 1 << 20
    ) -> Response:
        """A call without a body; returns the response once its head is read."""
        sock = self.connect()
        sock.sendall(self.request_head(endpoint, params))
        return Response(self, limit=limit)


class Response:
    """The answer to a call: status, headers, and the body as a stream (chunked or not).

    ``read`` returns decoded body bytes; at the end, an ``X-Stream-Error`` trailer raises
    KuboError. At most ``limit`` body bytes are read: past it the call fails (a caller that
    expects a big body passes its own bound). kubo streams in chunks of 4 KiB, so the chunked
    framing is decoded from a large receive buffer, many chunks per ``read``.
    """

    def __init__(self, call: Call, *, limit: int) -> None:
        if call.sock is None:
            raise KuboError("the call is not connected")
        self._sock = call.sock
        self._space = bytearray(_RECEIVE)
        self._buf = b""  # received and not consumed yet, from self._pos
        self._pos = 0
        self.limit = limit
        self.received = 0
        self.trailers: dict[str, str] = {}
        self._chunk_left = 0
        self._crlf_due = False  # the CRLF that ends a chunk's data
        self._done = False
        status_line = self._line()
        try:
            _version, code, *_ = status_line.split(" ", 2)
            self.status = int(code)
        except ValueError:
            raise KuboError(f"not an HTTP answer: {status_line[:80]!r}") from None
        self.headers = self._header_block()
        encoding = self.headers.get("transfer-encoding", "").lower()
        self._chunked = "chunked" in encoding
        length = self.headers.get("content-length")
        self._left: int | None = None
        if not self._chunked and length is not None:
            try:
                self._left = int(length)
            except ValueError:
                raise KuboError(f"bad Content-Length {length!r}") from None

    def _more(self) -> bool:
        """Receive what the socket has (at least a byte); False at the end of the connection."""
        count = self._sock.recv_into(self._space)
        if not count:
            return False
        data = bytes(memoryview(self._space)[:count])
        self._buf = self._buf[self._pos :] + data if self._pos < len(self._buf) else data
        self._pos = 0
        return True

    def _line(self) -> str:
        while True:
            end = self._buf.find(b"\n", self._pos)
            if end >= 0:
                line = self._buf[self._pos : end]
                self._pos = end + 1
                return line.decode("latin-1").rstrip("\r")
            if len(self._buf) - self._pos > _HEADER_LIMIT:
                raise KuboError("an HTTP line from kubo is too long")
            if not self._more():
                raise KuboError("kubo closed the connection")

    def _header_block(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(_HEADERS_MAX):
            line = self._line()
            if not line:
                return headers
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        raise KuboError("too many HTTP headers from kubo")

    def read(self, size: int = 1 << 20) -> bytes:
        """Up to ``size`` body bytes (what has arrived, at least one); b"" at the end."""
        if self._done:
            return b""
        data = self._read_chunked(size) if self._chunked else self._read_plain(size)
        self.received += len(data)
        if self.received > self.limit:
            raise KuboError(f"kubo's answer is larger than the {self.limit} bytes expected")
        return data

    def _read_plain(self, size: int) -> bytes:
        if self._left is not None:
            if self._left == 0:
                return self._finish()
            size = min(size, self._left)
        if self._pos >= len(self._buf) and not self._more():
            if self._left is not None:
                raise KuboError("kubo closed the connection in the middle of its answer")
            return self._finish()
        data = self._buf[self._pos : self._pos + size]
        self._pos += len(data)
        if self._left is not None:
            self._left -= len(data)
        return data

    def _read_chunked(self, size: int) -> bytes:
        pieces: list[memoryview] = []
        got = 0
        while got < size:
            buffered = len(self._buf) - self._pos
            if self._crlf_due:
                if buffered < 2:
                    if pieces:
                        break  # hand over what we have rather than wait
                    if not self._more():
                        raise KuboError("kubo closed the connection in the middle of its answer")
                    continue
                if self._buf[self._pos : self._pos + 2] != b"\r\n":
                    raise KuboError("bad chunk framing in kubo's answer")
                self._pos += 2
                self._crlf_due = False
                continue
            if self._chunk_left == 0:
                if pieces and self._buf.find(b"\n", self._pos) < 0:
                    break
                size_line = self._line()
                try:
                    chunk = int(size_line.split(";", 1)[0].strip(), 16)
                except ValueError:
                    raise KuboError(f"bad chunk size {size_line[:40]!r}") from None
                if chunk < 0:
                    raise KuboError(f"bad chunk size {size_line[:40]!r}")
                if chunk == 0:
                    self.trailers = self._header_block()
                    self._finish()  # raises kubo's stream error, if any
                    break
                self._chunk_left = chunk
                continue
            if buffered == 0:
                if pieces:
                    break
                if not self._more():
                    raise KuboError("kubo closed the connection in the middle of its answer")
                continue
            take = min(self._chunk_left, size - got, buffered)
            pieces.append(memoryview(self._buf)[self._pos : self._pos + take])
            self._pos += take
            self._chunk_left -= take
            got += take
            if self._chunk_left == 0:
                self._crlf_due = True
        return b"".join(pieces)

    def _finish(self) -> bytes:
        self._done = True
        stream_error = self.trailers.get("x-stream-error") or self.headers.get("x-stream-error")
        if stream_error:
            raise KuboError(stream_error, status=self.status)
        return b""

    def read_all(self) -> bytes:
        parts = []
        while data := self.read():
            parts.append(data)
        return b"".join(parts)

    def lines(self, max_line: int = 1 << 20) -> Iterator[bytes]:
        """The body split at newlines (kubo's streamed JSON); a longer line fails the call."""
        pending = b""
        while data := self.read():
            pending += data
            *complete, pending = pending.split(b"\n")
            for line in complete:
                if line.strip():
                    yield line
            if len(pending) > max_line:
                raise KuboError(f"a line of kubo's answer is over {max_line} bytes")
        if pending.strip():
            yield pending

    def json(self) -> Any:
        body = self.read_all()
        try:
            return json.loads(body)
        except ValueError:
            raise KuboError(f"kubo's answer is not JSON: {body[:80]!r}") from None

    def raise_for_status(self, what: str) -> None:
        """For a non-200 answer, raise KuboError with kubo's message (read from a small body)."""
        if self.status == 200:
            return
        self.limit = self.received + 64 * 1024
        try:
            body = self.read_all()
        except KuboError:
            body = b""
        message = body.decode("utf-8", "replace").strip()
        with contextlib.suppress(ValueError, AttributeError):
            message = str(json.loads(body).get("Message", message)).strip()
        raise KuboError(f"{what}: {message or f'HTTP {self.status}'}", status=self.status)


async def run_call(call: Call, work: Callable[[], T], *, grace: float = 30.0) -> T:
    """Run ``work`` (blocking I/O on ``call``) in a thread of its own and return its result.

    If the awaiting task is cancelled (or its deadline passes), the call's socket is shut down,
    which makes the thread's blocked I/O fail; the cancellation goes on once the thread has
    stopped (at most ``grace`` seconds), so no write of the thread happens after this returns.
    A thread per call (not the loop's default pool) keeps a send and a receive of one call from
    waiting on each other for a free worker thread.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def target() -> None:
        try:
            result = work()
        except BaseException as exc:
            outcome: tuple[bool, Any] = (False, exc)
        else:
            outcome = (True, result)
        finally:
            call.close()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    thread = threading.Thread(target=target, name="bacq-kubo-rpc", daemon=True)
    thread.start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        call.abort()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(future), timeout=grace)
        raise
