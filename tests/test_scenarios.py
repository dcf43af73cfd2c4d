"""The reference report's executor scenarios, each run through a real devstack to its verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from bacq.client import Client
from bacq.storage import Storage
from tests.scenarios import SCENARIOS, Scenario, run_scenario

DEVSTACK = {"workers": 2}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_scenario_produces_expected_results(
    scenario: Scenario, client: Client, storage: Storage, tmp_path: Path
) -> None:
    await run_scenario(scenario, client, storage, tmp_path)


async def test_identical_output_gives_identical_cid_on_every_worker(
    client: Client, storage: Storage, tmp_path: Path
) -> None:
    scenario = SCENARIOS[1]  # output volume, debian image
    await run_scenario(scenario, client, storage, tmp_path, concurrency=2, confidence=2)
    job = (await client.jobs())[0]
    cids = {e.result_cid for e in job.executions.values()}
    assert len(cids) == 1
    assert job.result_cid in cids
