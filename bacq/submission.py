"""Submitting jobs to the requester: one spec (``bacq.api.submit``) or many in batches
(``bacq.api.submit_many``), each with an idempotency key so that a retry never submits twice.

Touches NATS only: core request/reply on a nats-py connection (no JetStream, no job records).
Requests and replies are the JSON of ``bacq.models``' ``SubmitRequest``/``SubmitReply`` and
``SubmitManyRequest``/``SubmitManyReply``, written and read here as plain JSON, so that
``bacq run --no-wait`` need not build the message models. ``connect`` opens such a connection
with the options and error messages of ``Bus.connect`` (the ``Client`` passes its bus's).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bacq import corenats, subjects
from bacq.auth import NatsOptions
from bacq.errors import RequestRejected, SpecError

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

# asyncio and nats-py are imported by the functions that use them: `bacq run --no-wait` submits
# through bacq.corenats (submit_one_quick) and needs neither

__all__ = ["Outcome", "batches", "connect", "fresh_key", "submit_many", "submit_one"]

PAYLOAD_MARGIN = 4096  # bytes of a request's payload kept free under the server's max_payload
# specs per bulk request and requests outstanding at once: the requester records every spec
# (JetStream writes) before it answers, so a few mid-sized batches in flight keep it busy
# without piling up thousands of half-done submissions (measured: 250 x 4 beat 1000 x 1..4)
BATCH_SIZE = min(250, subjects.SUBMIT_MANY_MAX)
BATCHES_IN_FLIGHT = 4
# seconds a bulk submission waits for a requester that stopped listening (restart, failover, a
# reconnection): its keys make the retry safe, and giving up halfway leaves a file half-submitted
REQUESTER_PATIENCE = 30.0
FAILOVER_PATIENCE = corenats.FAILOVER_PATIENCE  # a single submission's wait for a requester


def fresh_key() -> str:
    return f"auto-{uuid.uuid4().hex}"


async def connect(url: str, *, name: str = "bacq-client", wait: float = 5.0) -> NatsClient:
    """A plain NATS connection for submitting (a client's credentials, as ``Bus.connect``)."""
    import asyncio

    import nats
    import nats.errors

    options = NatsOptions.from_env("client")
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        if "authorization violation" in str(exc).lower():
            refused.append(str(exc))

    try:
        async with asyncio.timeout(wait):
            nc: NatsClient = await nats.connect(
                [u.strip() for u in url.split(",") if u.strip()],
                name=name,
                connect_timeout=min(wait, 5.0),
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                error_cb=on_error,
                **options.connect_kwargs(),
            )
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        why = f"no answer within {wait:g}s" if isinstance(exc, TimeoutError) else str(exc)
        if refused or isinstance(exc, nats.errors.AuthorizationError):
            raise corenats.refused(url, name, options) from None
        raise corenats.not_reached(url, why) from None
    return nc


async def _request(
    nc: NatsClient,
    url: str,
    subject: str,
    payload: bytes,
    *,
    timeout: float,
    attempts: int,
    patience: float = FAILOVER_PATIENCE,
) -> dict[str, Any]:
    """Ask the requester, again on no answer (``attempts`` times), and again while nobody
    listens on ``subject`` (for ``patience`` seconds: a requester restarting, failing over or
    reconnecting); the same payload, so the same idempotency keys, every time."""
    import asyncio

    import nats.errors

    loop = asyncio.get_running_loop()
    give_up = loop.time() + patience
    delay, attempt = 0.5, 0
    while True:
        try:
            msg = await nc.request(subject, payload, timeout=timeout)
        except nats.errors.NoRespondersError:
            if loop.time() + delay > give_up:
                raise corenats.no_requester(
                    subject, url, many=subject == subjects.SUBMIT_MANY
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 4.0)
            continue
        except (TimeoutError, nats.errors.TimeoutError):
            attempt += 1
            if attempt >= attempts:
                raise corenats.unanswered(attempts, timeout) from None
            continue
        return _reply(msg.data, subject)


def _reply(data: bytes, subject: str) -> dict[str, Any]:
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise RequestRejected(f"the requester's answer on {subject} is not a JSON object")
    return reply


def _problems(reply: dict[str, Any]) -> list[tuple[str, str]]:
    found = reply.get("problems") or []
    return [
        (str(p.get("field", "spec")), str(p.get("message", "")))
        for p in found
        if isinstance(p, dict)
    ]


async def submit_one(
    nc: NatsClient,
    url: str,
    spec: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    timeout: float = 10.0,
    attempts: int = 3,
) -> str:
    """Submit one checked spec (its JSON form); return the job id."""
    payload = _submit_payload(spec, idempotency_key)
    reply = await _request(nc, url, subjects.SUBMIT, payload, timeout=timeout, attempts=attempts)
    return _job_id(reply)


def submit_one_quick(
    conn: corenats.Connection,
    url: str,
    spec: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    timeout: float = 10.0,
    attempts: int = 3,
) -> str:
    """``submit_one`` over a blocking ``bacq.corenats`` connection (no asyncio, no nats-py)."""
    payload = _submit_payload(spec, idempotency_key)
    data = corenats.request(conn, url, subjects.SUBMIT, payload, timeout=timeout, attempts=attempts)
    return _job_id(_reply(data, subjects.SUBMIT))


def _submit_payload(spec: dict[str, Any], idempotency_key: str | None) -> bytes:
    """A SubmitRequest's JSON (a fresh key when none is given: a retry must reuse the payload)."""
    return json.dumps(
        {"spec": spec, "idempotency_key": idempotency_key or fresh_key()}, separators=(",", ":")
    ).encode()


def _job_id(reply: dict[str, Any]) -> str:
    """The job id of a submission's reply, or its problems (SpecError) or error."""
    problems = _problems(reply)
    if problems:
        raise SpecError(problems)
    job_id = reply.get("job_id")
    if reply.get("error") or not isinstance(job_id, str) or not job_id:
        raise RequestRejected(str(reply.get("error") or "the requester returned no job id"))
    return job_id


@dataclass
class Outcome:
    """What became of one spec of a bulk submission."""

    index: int
    job_id: str | None = None
    error: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.job_id is not None


def batches(sizes: Sequence[int], *, max_count: int, max_bytes: int) -> list[range]:
    """Split specs of these encoded sizes into consecutive runs of at most ``max_count`` specs
    and ``max_bytes`` bytes each (a spec alone over ``max_bytes`` is a run of its own)."""
    runs: list[range] = []
    start, used = 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= max_count or used + size > max_bytes):
            runs.append(range(start, index))
            start, used = index, 0
        used += size + 1  # the comma
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


async def submit_many(
    nc: NatsClient,
    url: str,
    specs: Sequence[dict[str, Any] | bytes],
    idempotency_keys: Sequence[str | None] | None = None,
    *,
    timeout: float = 60.0,
    attempts: int = 3,
    max_count: int = BATCH_SIZE,
    in_flight: int = BATCHES_IN_FLIGHT,
) -> list[Outcome]:
    """Submit checked specs (their JSON forms, as dicts or encoded) in batches under the count
    and the server's payload limits, a few batches at a time; the outcomes are in the order of
    ``specs``."""
    import asyncio

    if idempotency_keys is not None and len(idempotency_keys) != len(specs):
        raise ValueError("idempotency_keys must have one key per spec")
    # without keys of the caller's, each batch carries one key of its own (batch_key: one
    # idempotency write per batch on the requester, not one per spec; a retry of the batch gets
    # the same jobs); with them, each spec its key (a fresh one where it has none)
    per_spec = idempotency_keys is not None and any(k is not None for k in idempotency_keys)
    keys = [
        (idempotency_keys[i] if idempotency_keys is not None else None) or fresh_key()
        for i in range(len(specs))
    ]
    encoded = [
        s if isinstance(s, bytes) else json.dumps(s, separators=(",", ":")).encode() for s in specs
    ]
    quoted = [json.dumps(k).encode() for k in keys]
    max_bytes = max(1024, (nc.max_payload or 1024 * 1024) - PAYLOAD_MARGIN)
    sizes = [len(e) + (len(q) + 2 if per_spec else 1) for e, q in zip(encoded, quoted, strict=True)]
    outcomes = [Outcome(i) for i in range(len(specs))]
    for index, size in enumerate(sizes):
        if size > max_bytes:
            outcomes[index].error = (
                f"the spec is {size} bytes, more than NATS's max payload of {max_bytes} bytes "
                "allows in one request; make it smaller (e.g. fewer env values or inputs)"
            )
    runs = batches(
        [0 if outcomes[i].error else s for i, s in enumerate(sizes)],
        max_count=max_count,
        max_bytes=max_bytes,
    )
    gate = asyncio.Semaphore(in_flight)

    async def send(run: range) -> None:
        wanted = [i for i in run if outcomes[i].error is None]
        if not wanted:
            return
        keyed = (
            b'"idempotency_keys":[' + b",".join(quoted[i] for i in wanted) + b"]"
            if per_spec
            else b'"batch_key":' + json.dumps(fresh_key()).encode()
        )
        payload = b'{"specs":[' + b",".join(encoded[i] for i in wanted) + b"]," + keyed + b"}"
        async with gate:
            reply = await _request(
                nc,
                url,
                subjects.SUBMIT_MANY,
                payload,
                timeout=timeout,
                attempts=attempts,
                patience=REQUESTER_PATIENCE,
            )
        results = reply.get("results")
        if reply.get("error") or not isinstance(results, list) or len(results) != len(wanted):
            why = reply.get("error") or (
                f"the requester answered {len(results) if isinstance(results, list) else 'no'} "
                f"results for {len(wanted)} specs"
            )
            for i in wanted:
                outcomes[i].error = str(why)
            return
        for i, result in zip(wanted, results, strict=True):
            result = result if isinstance(result, dict) else {}
            outcomes[i].problems = _problems(result)
            job_id = result.get("job_id")
            if isinstance(job_id, str) and job_id and not outcomes[i].problems:
                outcomes[i].job_id = job_id
            elif not outcomes[i].problems:
                outcomes[i].error = str(result.get("error") or "the requester returned no job id")

    await asyncio.gather(*(send(run) for run in runs))
    return outcomes
