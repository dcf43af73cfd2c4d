"""Known answers: a deterministic job equal to an accepted one is answered with its result at
once, recorded as such in its history; ``no_cache`` runs it again."""

from __future__ import annotations

from collections.abc import Callable

from bacq.client import Client
from bacq.devstack import Devstack
from bacq.states import JobState
from tests.scenarios import BUSYBOX

HELLO = {"image": BUSYBOX, "command": ["echo", "hello"], "timeout": 60}


async def test_a_deterministic_job_equal_to_an_accepted_one_is_answered_at_once(
    make_stack: Callable[..., Devstack],
) -> None:
    stack = make_stack(workers=1)
    spec = {**HELLO, "command": ["echo", "known"], "deterministic": True}
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        first = await client.wait(await client.submit(spec), timeout=120)
        assert first.state == JobState.ACCEPTED, first.reason
        # the same work, asked differently (how it runs is no part of the answer)
        again = await client.wait(await client.submit({**spec, "timeout": 99}), timeout=30)
        assert again.state == JobState.ACCEPTED
        assert again.result_cid == first.result_cid
        assert again.reason.startswith(f"known answer: job {first.id}")
        assert not again.executions  # no worker ran it
        history = await client.history(again.id)
        assert [e.state for e in history] == ["pending", "accepted"]
        fresh = await client.wait(await client.submit({**spec, "no_cache": True}), timeout=120)
        assert fresh.executions
        assert fresh.result_cid == first.result_cid
