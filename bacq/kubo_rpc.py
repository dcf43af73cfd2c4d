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
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote, urlencode

__all__ = ["Call", "KuboError", "Response", "parse_maddr", "run_call"]

T = TypeVar("T")
_HEADER_LIMIT = 64 * 1024  # a longer status line, header or chunk-size line is refused
_HEADERS_MAX = 100


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
        self.files: list[BinaryIO] = []  # the socket's file objects, closed with it
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
        for file in self.files:
            with contextlib.suppress(OSError):
                file.close()
        self.files.clear()
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
    expects a big body passes its own bound).
    """

    def __init__(self, call: Call, *, limit: int) -> None:
        if call.sock is None:
            raise KuboError("the call is not connected")
        self._call = call
        self._file: BinaryIO = call.sock.makefile("rb", buffering=1 << 20)  # type: ignore[assignment]
        call.files.append(self._file)
        self.limit = limit
        self.received = 0
        self.trailers: dict[str, str] = {}
        self._chunk_left = 0
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

    def _line(self) -> str:
        line = self._file.readline(_HEADER_LIMIT)
        if not line:
            raise KuboError("kubo closed the connection")
        if not line.endswith(b"\n"):
            raise KuboError("an HTTP line from kubo is too long")
        return line.decode("latin-1").rstrip("\r\n")

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
        """Up to ``size`` body bytes (fewer at a chunk's end); b"" at the end of the body."""
        if self._done:
            return b""
        if self._chunked:
            if self._chunk_left == 0:
                size_line = self._line()
                try:
                    chunk = int(size_line.split(";", 1)[0].strip(), 16)
                except ValueError:
                    raise KuboError(f"bad chunk size {size_line[:40]!r}") from None
                if chunk == 0:
                    self.trailers = self._header_block()
                    return self._finish()
                self._chunk_left = chunk
            want = min(size, self._chunk_left)
        elif self._left is not None:
            if self._left == 0:
                return self._finish()
            want = min(size, self._left)
        else:
            want = size
        data = self._file.read(want)
        if not data:
            if self._chunked or self._left is not None:
                raise KuboError("kubo closed the connection in the middle of its answer")
            return self._finish()
        if len(data) < want and (self._chunked or self._left is not None):
            raise KuboError("kubo closed the connection in the middle of its answer")
        self.received += len(data)
        if self.received > self.limit:
            raise KuboError(f"kubo's answer is larger than the {self.limit} bytes expected")
        if self._chunked:
            self._chunk_left -= len(data)
            if self._chunk_left == 0 and self._file.read(2) != b"\r\n":
                raise KuboError("bad chunk framing in kubo's answer")
        elif self._left is not None:
            self._left -= len(data)
        return data

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
