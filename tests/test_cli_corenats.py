"""bacq.corenats, the CLI's blocking core-NATS request, against a real nats-server with users:
replies, no responders, deadlines, refused credentials, unreachable servers, and the cases it
leaves to nats-py."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from bacq import corenats, submission
from bacq.auth import NatsOptions
from bacq.devstack import Devstack
from bacq.errors import NatsUnavailable, RequestRejected, SpecError

DEVSTACK = {"workers": 0, "kubo_nodes": 1}


@pytest.fixture
def echo(bare_nats: str) -> Iterator[str]:
    """A responder (nats-py, in a thread of its own) on the bare server: it echoes what it
    gets, and answers ``slow`` never."""
    subject = "corenats.echo"
    ready = threading.Event()
    stop = threading.Event()

    async def serve() -> None:
        nc = await nats.connect(bare_nats)

        async def answer(msg: Msg) -> None:
            if msg.data != b"slow":
                await msg.respond(b"echo:" + msg.data)

        await nc.subscribe(subject, cb=answer)
        await nc.flush()
        ready.set()
        await asyncio.to_thread(stop.wait)
        await nc.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30), "the responder did not start"
    try:
        yield subject
    finally:
        stop.set()
        thread.join(30)


def _connect(stack: Devstack, **changes: object) -> corenats.Connection:
    options = dataclasses.replace(stack.client_options(), **changes)
    return corenats.connect(stack.nats.url, options, name="test")


def test_a_request_gets_its_reply_and_a_large_one_too(bare_nats: str, echo: str) -> None:
    with corenats.connect(bare_nats, NatsOptions(role="client"), name="test") as conn:
        assert conn.request(echo, b"hello", timeout=10) == b"echo:hello"
        big = bytes(range(256)) * 2000  # 512 KB, in many reads
        assert conn.request(echo, big, timeout=10) == b"echo:" + big
        with pytest.raises(RequestRejected, match="more than NATS's max payload"):
            conn.request(echo, b"x" * (conn.max_payload + 1), timeout=10)


def test_no_responders_and_an_unanswered_request_end_clearly(bare_nats: str, echo: str) -> None:
    with corenats.connect(bare_nats, NatsOptions(role="client"), name="test") as conn:
        with pytest.raises(corenats.NoResponders):
            conn.request("nobody.here", b"x", timeout=10)
        started = time.monotonic()
        with pytest.raises(RequestRejected, match=r"did not answer 2 times in 0\.5s"):
            corenats.request(conn, bare_nats, echo, b"slow", timeout=0.5, attempts=2)
        assert time.monotonic() - started < 10
        with pytest.raises(RequestRejected, match="no requester answers submissions"):
            corenats.request(
                conn,
                bare_nats,
                "nobody.here",
                b"x",
                timeout=5,
                attempts=1,
                patience=0.6,
            )
        assert conn.request(echo, b"still", timeout=10) == b"echo:still"  # the same connection


def test_following_a_key_yields_its_value_then_each_newer_one_until_done(bare_nats: str) -> None:
    """corenats.follow_key (`bacq run --output json` waiting): the key's current value, then
    the values written after it, in order and none twice, ending with the one that is done."""
    bucket, values = "follow-test", [b"2", b"3", b"4", b"done"]

    async def put(first: bool) -> None:
        nc = await nats.connect(bare_nats)
        try:
            js = nc.jetstream()
            if first:
                kv = await js.create_key_value(bucket=bucket)
                await kv.put("k", b"1")
                return
            kv = await js.key_value(bucket)
            for value in values:
                await asyncio.sleep(0.2)
                await kv.put("k", value)
        finally:
            await nc.close()

    asyncio.run(put(first=True))
    writer = threading.Thread(target=asyncio.run, args=(put(first=False),), daemon=True)
    with corenats.connect(bare_nats, NatsOptions(role="client"), name="test") as conn:
        writer.start()
        got = list(corenats.follow_key(conn, bucket, "k", lambda v: v == b"done"))
        # the same connection still asks questions
        assert corenats.last_value(conn, bucket, "k") == b"done"
        assert corenats.last_value(conn, bucket, "nothing-here") is None
    writer.join(timeout=30)
    assert got[-1] == b"done"
    assert len(got) == len(set(got))
    assert got == [v for v in [b"1", *values] if v in got]  # in the order written
    with corenats.connect(bare_nats, NatsOptions(role="client"), name="test") as conn:
        # a key that is done already: its value, once, at once
        started = time.monotonic()
        assert list(corenats.follow_key(conn, bucket, "k", lambda v: v == b"done")) == [b"done"]
        assert time.monotonic() - started < 5


def test_a_submission_through_it_is_a_job_or_the_requester_s_problems(stack: Devstack) -> None:
    url = stack.nats.url
    with _connect(stack) as conn:
        # JetStream answers the client's user on its own inbox prefix too
        assert b"memory" in conn.request("$JS.API.INFO", b"", timeout=10)
        job_id = submission.submit_one_quick(
            conn, url, {"image": "bacq-test/busybox", "command": ["true"]}
        )
        assert job_id.startswith("j-")
        again = submission.submit_one_quick(
            conn, url, {"image": "bacq-test/busybox"}, idempotency_key="corenats-key"
        )
        assert again == submission.submit_one_quick(
            conn, url, {"image": "bacq-test/busybox"}, idempotency_key="corenats-key"
        )
        with pytest.raises(SpecError) as caught:
            submission.submit_one_quick(conn, url, {"image": "", "concurrency": 0})
        fields = {field for field, _ in caught.value.problems}
        assert {"image", "concurrency"} <= fields


def test_wrong_credentials_are_refused_by_name(stack: Devstack) -> None:
    with pytest.raises(NatsUnavailable, match=r"refused test .*authorization violation"):
        _connect(stack, password="wrong")


def test_an_unreachable_server_is_named_and_the_next_url_is_tried(stack: Devstack) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"nats://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(NatsUnavailable, match=f"cannot reach NATS at {dead}"):
        corenats.connect(dead, stack.client_options(), name="test")
    both = f"{dead},{stack.nats.url}"
    with corenats.connect(both, stack.client_options(), name="test") as conn:
        assert conn.max_payload > 0


def test_what_it_leaves_to_nats_py(stack: Devstack, tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n")
    for options in (
        NatsOptions(role="client", creds=str(creds)),
        NatsOptions(role="client", tls_ca=str(creds)),
    ):
        with pytest.raises(corenats.Unsupported):
            corenats.connect(stack.nats.url, options, name="test")
    for url in ("tls://127.0.0.1:4222", "ws://127.0.0.1:4222", "nats://u:p@127.0.0.1:4222"):
        with pytest.raises(corenats.Unsupported):
            corenats.connect(url, NatsOptions(role="client"), name="test")
