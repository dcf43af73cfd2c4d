"""Publishing into JetStream (and asking its API) with the answers on one inbox. Touches the NATS
connection it is given (one wildcard subscription under the connection's inbox prefix).

nats-py's ``JetStreamContext.publish`` is a request each: a fresh inbox token, a future, an
``asyncio.wait_for`` timer and a ``PubAck`` dataclass per message, ~45 µs of CPU beyond the
publish itself (measured: 58 against 13 µs per message). Here every message's reply subject is
``<inbox>.<n>`` on one subscription, the acknowledgement is read as plain JSON, and a batch of
messages (``publish_many``) shares one future and one deadline: the requester takes a bulk
submission's thousand records in two writes' time, not two thousand round trips. ``request`` is
the same for one request to the JetStream API (``Bus.get_value`` reads a key-value entry so).

The results are ``Ack``s; ``raise_for`` turns a failed one into the exception nats-py would have
raised (``nats.errors.TimeoutError``, ``NoStreamResponseError``, ``APIError`` and its subclasses),
so callers keep their retry rules.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["Ack", "AckInbox", "Outgoing"]

# (subject, payload, headers) of one message to publish
Outgoing = tuple[str, bytes, dict[str, str] | None]

_NO_RESPONDERS = "503"
_TIMEOUT = -1  # Ack.code of a message whose acknowledgement did not come in time
_NO_STREAM = -2  # Ack.code of a message no stream took (no responders)
_GARBLED = -3  # Ack.code of an acknowledgement that is not JSON


@dataclass(frozen=True, slots=True)
class Ack:
    """What the server answered for one message: its stream sequence (``duplicate`` when the
    stream held its Nats-Msg-Id already), or an error (``code`` not 0)."""

    seq: int = 0
    duplicate: bool = False
    code: int = 0  # the API error's HTTP-like code, or one of the negative codes above
    err_code: int = 0  # JetStream's own error code (10071: wrong last sequence, ...)
    description: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0

    def raise_for(self) -> None:
        """Raise what ``JetStreamContext.publish`` raises for this outcome (nothing when ok)."""
        if self.code == 0:
            return
        if self.code == _TIMEOUT:
            raise nats.errors.TimeoutError
        if self.code == _NO_STREAM:
            raise nats.js.errors.NoStreamResponseError
        raise nats.js.errors.APIError.from_error(
            {"code": self.code, "err_code": self.err_code, "description": self.description}
        )


class _Batch:
    __slots__ = ("done", "left", "replies")

    def __init__(self, count: int) -> None:
        self.replies: list[Msg | None] = [None] * count
        self.left = count
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


def _read(msg: Msg) -> Ack:
    if not msg.data:
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            return Ack(code=_NO_STREAM, description="no stream listens on the subject")
        return Ack(code=_GARBLED, description="an empty acknowledgement")
    try:
        answer = json.loads(msg.data)
    except ValueError:
        return Ack(code=_GARBLED, description="an acknowledgement that is not JSON")
    if not isinstance(answer, dict):
        return Ack(code=_GARBLED, description="an acknowledgement that is not an object")
    error = answer.get("error")
    if error is not None:
        error = error if isinstance(error, dict) else {}
        return Ack(
            code=int(error.get("code") or 500),
            err_code=int(error.get("err_code") or 0),
            description=str(error.get("description") or ""),
        )
    return Ack(seq=int(answer.get("seq") or 0), duplicate=bool(answer.get("duplicate")))


class AckInbox:
    """The acknowledgements of one connection's JetStream publishes, on one subscription."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: Subscription | None = None
        self._opening: asyncio.Lock | None = None
        self._next = 0
        self._waiting: dict[str, tuple[_Batch, int]] = {}

    async def _open(self) -> None:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._sub is None:
                prefix = self._nc.new_inbox()
                self._sub = await self._nc.subscribe(f"{prefix}.*", cb=self._on_ack)
                self._prefix = prefix + "."

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix) :]
        waiting = self._waiting.pop(token, None)
        if waiting is None:
            return  # late: its batch timed out (the caller retries), or not ours
        batch, index = waiting
        batch.replies[index] = msg
        batch.left -= 1
        if batch.left == 0 and not batch.done.done():
            batch.done.set_result(None)

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None, *, timeout: float
    ) -> Ack:
        """Publish one message into a stream and wait for its acknowledgement."""
        return (await self.publish_many([(subject, data, headers)], timeout=timeout))[0]

    async def publish_many(self, messages: Sequence[Outgoing], *, timeout: float) -> list[Ack]:
        """Publish ``messages`` back to back and wait up to ``timeout`` seconds for all their
        acknowledgements; one that did not come in time is a timeout ``Ack`` (the message may
        or may not be stored: publish it again with the same Nats-Msg-Id)."""
        return [
            _read(reply) if reply is not None else Ack(code=_TIMEOUT, description="no answer")
            for reply in await self.request_many(messages, timeout=timeout)
        ]

    async def request(self, subject: str, data: bytes, *, timeout: float) -> Msg:
        """A request (e.g. to the JetStream API) answered on this inbox: the reply, or
        ``nats.errors.TimeoutError``."""
        (reply,) = await self.request_many([(subject, data, None)], timeout=timeout)
        if reply is None:
            raise nats.errors.TimeoutError
        return reply

    async def request_many(
        self, messages: Sequence[Outgoing], *, timeout: float
    ) -> list[Msg | None]:
        """Send ``messages`` back to back with their replies to this inbox; each one's reply,
        or None for one that did not come within ``timeout`` seconds."""
        if not messages:
            return []
        if self._sub is None:
            await self._open()
        if self._nc.is_closed:
            raise nats.errors.ConnectionClosedError
        batch = _Batch(len(messages))
        tokens: list[str] = []
        try:
            for index, (subject, data, headers) in enumerate(messages):
                self._next += 1
                token = str(self._next)
                tokens.append(token)
                self._waiting[token] = (batch, index)
                await self._nc.publish(
                    subject, data, reply=self._prefix + token, headers=headers or None
                )
            try:
                async with asyncio.timeout(timeout):
                    await batch.done
            except TimeoutError:
                pass
        finally:
            for token in tokens:
                self._waiting.pop(token, None)
        return batch.replies
