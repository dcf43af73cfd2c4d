"""Prometheus metrics: a running devstack's requester, verifier and worker are scraped after a
job, and docs/metrics.md is what bacq.metrics generates."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bacq.client import Client
from bacq.devstack import Devstack
from bacq.metrics import METRICS, markdown
from bacq.states import JobState
from tests.scenarios import BUSYBOX

ROOT = Path(__file__).parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not scraped")


def test_docs_metrics_md_is_generated_from_the_definitions() -> None:
    shipped = (ROOT / "docs" / "metrics.md").read_text()
    assert shipped == markdown(), "regenerate: python -m bacq.metrics > docs/metrics.md"


async def test_a_devstack_exposes_its_metrics_after_a_job(
    make_stack: Callable[..., Devstack],
) -> None:
    ports = {role: _free_port() for role in ("requester", "verifier", "w1")}
    stack = make_stack(
        workers=1, role_env={role: {"BACQ_METRICS_PORT": str(p)} for role, p in ports.items()}
    )
    async with await Client.connect(stack.nats.url, options=stack.client_options()) as client:
        job = await client.wait(
            await client.submit({"image": BUSYBOX, "command": ["echo", "hi"]}), timeout=120
        )
    assert job.state == JobState.ACCEPTED, job.reason
    await asyncio.sleep(0.5)  # the verdict is folded, then counted
    requester = await asyncio.to_thread(_scrape, ports["requester"])
    verifier = await asyncio.to_thread(_scrape, ports["verifier"])
    worker = await asyncio.to_thread(_scrape, ports["w1"])
    assert _value(requester, 'bacq_jobs_finished_total{state="accepted"}') == 1
    assert _value(requester, 'bacq_verdicts_total{outcome="accepted"}') == 1
    assert _value(requester, 'bacq_assignments_total{result="confirmed"}') == 1
    assert _value(requester, "bacq_queue_wait_seconds_count") == 1
    assert _value(verifier, "bacq_verification_seconds_count") == 1
    assert _value(worker, 'bacq_execution_seconds_count{outcome="completed"}') == 1
    assert _value(worker, 'bacq_worker_slots{use="used"}') == 0
    for text in (requester, verifier, worker):
        assert "bacq_nats_reconnects_total 0.0" in text
    # every documented metric of the requester's kind is there
    for name, kind, _, _ in METRICS:
        if name.startswith(("bacq_jobs", "bacq_queue", "bacq_bids", "bacq_assignments")):
            assert f"# TYPE {name.removesuffix('_total')} {kind}" in requester or (
                f"# TYPE {name} {kind}" in requester
            ), name
