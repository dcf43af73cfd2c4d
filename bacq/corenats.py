"""A blocking core-NATS request over a plain socket, for the CLI's quick commands.

``bacq run --no-wait`` and ``bacq get`` ask one question each (a submission; a job record by its
key), and ``bacq run --output json`` follows one record to its end (``follow_key``): nats-py
would cost them asyncio and nats-py's own import, half their start-up. This module
speaks the few lines of the NATS client protocol they need (INFO, CONNECT, PING/PONG, SUB, PUB,
MSG/HMSG, the no-responders status) with the standard library, and only where that is the whole
story: a ``nats://`` server without TLS, with no credentials, a user and password, or a token.
``connect`` raises ``Unsupported`` otherwise (TLS, creds, nkeys, a URL with its own credentials)
and the caller uses nats-py, as it does for everything else.

Touches the NATS server(s) of the URL, nothing else. Every wait has a deadline; what the server
sends is bounded (a line, a message, the server's own max_payload).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from bacq.auth import NatsOptions
from bacq.errors import NatsUnavailable, RequestRejected

__all__ = [
    "Connection",
    "NoResponders",
    "Unsupported",
    "connect",
    "follow_key",
    "last_value",
    "no_requester",
    "not_reached",
    "request",
    "unanswered",
]

# seconds a submission waits for a requester to listen: a failover takes the lease's TTL and a
# renewal (5 s), then the new requester's start
FAILOVER_PATIENCE = 12.0
_MAX_LINE = 64 * 1024  # bytes of a protocol line (INFO lists a cluster's URLs)
_MAX_MESSAGE = 64 * 1024 * 1024  # bytes of a message, whatever the server's max_payload says
_MAX_BACKLOG = 1024  # pushed messages kept while a request waits for its answer


class Unsupported(Exception):
    """This connection needs nats-py (TLS, creds, nkeys, a URL with credentials)."""


class NoResponders(Exception):
    """Nobody listens on the subject (the server's 503 status)."""


def not_reached(url: str, why: str) -> NatsUnavailable:
    return NatsUnavailable(
        f"cannot reach NATS at {url} ({why}); start one with "
        "`bacq devstack` or set BACQ_NATS_URL / --nats to a running server"
    )


def refused(url: str, name: str, options: NatsOptions) -> NatsUnavailable:
    return NatsUnavailable(
        f"NATS at {url} refused {name} ({options.describe()}): authorization "
        "violation; check the "
        "credentials (BACQ_NATS_USER/_PASSWORD, _TOKEN, _CREDS or _NKEY)"
    )


def no_requester(subject: str, url: str, many: bool) -> RequestRejected:
    what = "bulk submissions" if many else "submissions"
    return RequestRejected(
        f"no requester answers {what} ({subject}) on NATS at {url}; start one "
        "(`bacq devstack`, or `bacq requester`), or update one older than this client"
    )


def unanswered(attempts: int, timeout: float) -> RequestRejected:
    return RequestRejected(
        f"the requester did not answer {attempts} times in {timeout:g}s; is it overloaded or stuck?"
    )


def _servers(url: str) -> list[tuple[str, int]]:
    found = []
    for one in (u.strip() for u in url.split(",")):
        if not one:
            continue
        scheme, sep, rest = one.partition("://")
        if not sep:
            scheme, rest = "nats", one
        if scheme != "nats" or "@" in rest or "/" in rest.rstrip("/"):
            raise Unsupported(one)
        host, _, port = rest.rstrip("/").rpartition(":")
        if not host:
            host, port = port, "4222"
        try:
            number = int(port)
        except ValueError:
            raise Unsupported(one) from None
        found.append((host.strip("[]"), number))
    if not found:
        raise Unsupported(url)
    return found


class Connection:
    """One NATS connection: ``request`` (one at a time), ``subscribe`` and ``next_message``,
    ``close``."""

    def __init__(self, sock: socket.socket, inbox: str, max_payload: int) -> None:
        self.sock = sock
        self.max_payload = max_payload
        self._inbox_prefix = inbox
        self._inbox = self.new_inbox()
        self._buffer = b""
        self._subscribed = False
        self._sent = 0
        self._sids = 1  # sid 1: the request inbox
        # messages of our subscriptions that came while a request waited for its answer
        self._backlog: list[tuple[str, bytes, bytes]] = []

    def new_inbox(self) -> str:
        """A subject of our own, under the user's ``_INBOX`` prefix (none of ``request``'s)."""
        return f"{self._inbox_prefix}.{secrets.token_hex(8)}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------------
    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        data = self.sock.recv(256 * 1024)
        if not data:
            raise ConnectionResetError("the NATS server closed the connection")
        self._buffer += data

    def _line(self, deadline: float) -> bytes:
        while b"\r\n" not in self._buffer:
            if len(self._buffer) > _MAX_LINE:
                raise ConnectionError("a line from the NATS server is too long")
            self._fill(deadline)
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def _take(self, count: int, deadline: float) -> bytes:
        while len(self._buffer) < count + 2:
            self._fill(deadline)
        data, self._buffer = self._buffer[:count], self._buffer[count + 2 :]
        return data

    def _next(self, deadline: float) -> tuple[str, bytes, bytes]:
        """The next message for us: (subject, headers, payload); answers PINGs on the way."""
        while True:
            line = self._line(deadline)
            op, _, rest = line.partition(b" ")
            op = op.upper()
            if op == b"PING":
                self.sock.sendall(b"PONG\r\n")
            elif op in (b"PONG", b"+OK", b"INFO"):
                continue
            elif op == b"-ERR":
                raise ConnectionError(rest.decode(errors="replace").strip().strip("'"))
            elif op in (b"MSG", b"HMSG"):
                fields = rest.split()
                sizes = [int(f) for f in fields[-2 if op == b"HMSG" else -1 :]]
                if sizes[-1] > _MAX_MESSAGE or sizes[0] > sizes[-1]:
                    raise ConnectionError("a message from the NATS server is too large")
                data = self._take(sizes[-1], deadline)
                head_size = sizes[0] if op == b"HMSG" else 0
                return fields[0].decode(errors="replace"), data[:head_size], data[head_size:]
            else:
                raise ConnectionError(f"the NATS server said {line[:80]!r}")

    # -- operations -------------------------------------------------------------------------------
    def subscribe(self, subject: str) -> int:
        """Subscribe to ``subject``; its messages come from ``next_message``. Returns the sid."""
        self._sids += 1
        self.sock.sendall(f"SUB {subject} {self._sids}\r\n".encode())
        return self._sids

    def next_message(self, timeout: float) -> tuple[str, bytes, bytes]:
        """The next message of a subscription: (subject, headers, payload); TimeoutError."""
        if self._backlog:
            return self._backlog.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            message = self._next(deadline)
            if not message[0].startswith(f"{self._inbox}."):  # (not a late answer)
                return message

    def request(self, subject: str, payload: bytes, timeout: float) -> bytes:
        """One request and its reply; NoResponders, TimeoutError or OSError."""
        if len(payload) > self.max_payload:
            raise RequestRejected(
                f"the request is {len(payload)} bytes, more than NATS's max payload of "
                f"{self.max_payload} bytes"
            )
        self._sent += 1
        reply = f"{self._inbox}.{self._sent}"
        out = b""
        if not self._subscribed:
            out += f"SUB {self._inbox}.* 1\r\n".encode()
            self._subscribed = True
        out += f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + b"\r\n"
        self.sock.sendall(out)
        deadline = time.monotonic() + timeout
        while True:
            got, headers, data = self._next(deadline)
            if got != reply:
                if not got.startswith(f"{self._inbox}.") and len(self._backlog) < _MAX_BACKLOG:
                    self._backlog.append((got, headers, data))  # a subscription's: kept
                continue  # (or a late answer to an earlier attempt)
            if headers.startswith(b"NATS/1.0 503"):
                raise NoResponders(subject)
            return data


def connect(url: str, options: NatsOptions, *, name: str, wait: float = 5.0) -> Connection:
    """A connection to the first server of ``url`` that answers, like nats-py's (the same
    credentials and inbox prefix); NatsUnavailable as ``bacq.submission.connect`` words it;
    Unsupported when nats-py must do it."""
    if options.creds or options.nkey or options.tls_ca or options.tls_cert:
        raise Unsupported("credentials or TLS")
    servers = _servers(url)
    deadline = time.monotonic() + wait
    last = "no server answered"
    for host, port in servers:
        left = deadline - time.monotonic()
        if left <= 0:
            last = f"no answer within {wait:g}s"
            break
        try:
            sock = socket.create_connection((host, port), timeout=min(left, 5.0))
        except OSError as exc:
            last = exc.strerror or str(exc)
            continue
        try:
            return _handshake(sock, url, options, name, deadline)
        except (TimeoutError, OSError) as exc:
            sock.close()
            last = f"no answer within {wait:g}s" if isinstance(exc, TimeoutError) else str(exc)
        except BaseException:
            sock.close()
            raise
    raise not_reached(url, last)


def _handshake(
    sock: socket.socket, url: str, options: NatsOptions, name: str, deadline: float
) -> Connection:
    conn = Connection(sock, options.inbox, 1024 * 1024)
    op, _, rest = conn._line(deadline).partition(b" ")
    if op.upper() != b"INFO":
        raise ConnectionError("the server did not introduce itself as NATS")
    try:
        info: dict[str, Any] = json.loads(rest)
    except ValueError:
        raise ConnectionError("the NATS server's INFO is not JSON") from None
    if info.get("tls_required") or not info.get("headers", False):
        raise Unsupported("the server wants TLS, or has no headers")
    conn.max_payload = int(info.get("max_payload") or conn.max_payload)
    hello: dict[str, Any] = {
        "verbose": False,
        "pedantic": False,
        "lang": "python3",
        "version": "bacq",
        "protocol": 1,
        "headers": True,
        "no_responders": True,
        "name": name,
    }
    if options.user:
        hello.update(user=options.user, **{"pass": options.password})
    if options.token:
        hello["auth_token"] = options.token
    sock.sendall(b"CONNECT " + json.dumps(hello).encode() + b"\r\nPING\r\n")
    while True:
        line = conn._line(deadline)
        op = line.partition(b" ")[0].upper()
        if op == b"PONG":
            return conn
        if op == b"PING":
            sock.sendall(b"PONG\r\n")
        elif op == b"-ERR":
            if b"authorization" in line.lower() or b"authentication" in line.lower():
                raise refused(url, name, options)
            raise ConnectionError(line[5:].decode(errors="replace").strip().strip("'"))
        elif op not in (b"+OK", b"INFO"):
            raise ConnectionError(f"the NATS server said {line[:80]!r}")


def request(
    conn: Connection,
    url: str,
    subject: str,
    payload: bytes,
    *,
    timeout: float,
    attempts: int,
    patience: float = FAILOVER_PATIENCE,
    many: bool = False,
) -> bytes:
    """``bacq.submission``'s retry policy: again on no answer (``attempts`` times, the same
    payload), and again while nobody listens (for ``patience`` seconds)."""
    give_up = time.monotonic() + patience
    delay, attempt = 0.5, 0
    while True:
        try:
            return conn.request(subject, payload, timeout)
        except NoResponders:
            if time.monotonic() + delay > give_up:
                raise no_requester(subject, url, many) from None
            time.sleep(delay)
            delay = min(delay * 2, 4.0)
        except TimeoutError:
            attempt += 1
            if attempt >= attempts:
                raise unanswered(attempts, timeout) from None


# -- key-value records ----------------------------------------------------------------------------
def last_value(conn: Connection, bucket: str, key: str, *, timeout: float = 10.0) -> bytes | None:
    """The value of ``key`` in the key-value ``bucket`` (JetStream's message get), or None when
    it has none (never written, deleted or purged)."""
    data = conn.request(
        f"$JS.API.STREAM.MSG.GET.KV_{bucket}",
        json.dumps({"last_by_subj": f"$KV.{bucket}.{key}"}).encode(),
        timeout=timeout,
    )
    try:
        found = kv_entry(json.loads(data).get("message") or {})
    except (ValueError, TypeError, AttributeError):
        return None
    if found is None or not found[0]:
        return None
    return found[0]


def kv_entry(message: dict[str, Any]) -> tuple[bytes, int] | None:
    """The value and revision of a key-value entry from the ``message`` of a JetStream message
    get's answer, or None for a delete or purge marker (also ``bacq.bus.Bus.get_value``)."""
    import base64

    if b"KV-Operation" in base64.b64decode(message.get("hdrs") or ""):
        return None
    return base64.b64decode(message.get("data") or ""), int(message.get("seq") or 0)


# the server says "still here" after this many seconds without a message; a watch that hears
# neither for three times as long reads the key afresh and watches anew
_HEARTBEAT = 5.0


def follow_key(
    conn: Connection, bucket: str, key: str, done: Callable[[bytes], bool]
) -> Iterator[bytes]:
    """Every new value of ``key`` in ``bucket``, from its current one, until one is ``done``
    (that one is the last yielded). A push consumer of the bucket's stream, filtered to the key,
    that the server drops ``_HEARTBEAT`` x 2 s after we stop listening; each quiet spell (the
    server's heartbeat) the key is read afresh, so a value lost on the way costs a few seconds,
    never the end. Waits as long as the caller lets it (Ctrl-C, or a deadline of its own)."""
    stream = f"KV_{bucket}"
    deliver, wanted = conn.new_inbox(), f"$KV.{bucket}.{key}"
    conn.subscribe(deliver)
    seen: bytes | None = None

    def fresh() -> bytes | None:
        nonlocal seen
        value = last_value(conn, bucket, key)
        if value is None or value == seen:
            return None
        seen = value
        return value

    while True:
        config = {
            "stream_name": stream,
            "config": {
                "deliver_subject": deliver,
                "filter_subject": wanted,
                "deliver_policy": "last_per_subject",
                "ack_policy": "none",
                "max_deliver": 1,
                "idle_heartbeat": int(_HEARTBEAT * 1e9),
                "inactive_threshold": int(_HEARTBEAT * 2e9),
                "mem_storage": True,
                "num_replicas": 1,
            },
        }
        answer = json.loads(
            conn.request(f"$JS.API.CONSUMER.CREATE.{stream}", json.dumps(config).encode(), 10.0)
        )
        if not isinstance(answer, dict) or answer.get("error"):
            error = answer.get("error") if isinstance(answer, dict) else answer
            raise RequestRejected(f"JetStream refused a watch of {key!r}: {error}")
        name = str(answer.get("name") or "")
        try:
            while True:
                try:
                    subject, headers, data = conn.next_message(3 * _HEARTBEAT)
                except TimeoutError:
                    break  # neither values nor heartbeats: the consumer is gone; anew
                if subject not in (deliver, wanted):  # (values keep their own subject)
                    continue
                if headers.startswith(b"NATS/1.0 100"):  # quiet: make sure nothing was lost
                    value = fresh()
                elif b"KV-Operation" in headers or not data or data == seen:
                    continue
                else:
                    value = seen = data
                if value is not None:
                    yield value
                    if done(value):
                        return
        finally:
            if name:
                # not waited for (the server drops it anyway once nobody listens); its answer
                # comes to the request inbox, where it is dropped as a late one
                delete = f"$JS.API.CONSUMER.DELETE.{stream}.{name}"
                with contextlib.suppress(OSError):
                    conn.sock.sendall(f"PUB {delete} {conn._inbox}.0 0\r\n\r\n".encode())
        value = fresh()
        if value is not None:
            yield value
            if done(value):
                return
