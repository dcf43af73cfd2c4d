"""The benchmark harness works: ``python -m bench --smoke`` against real components (no mocks).

Not a timed test: it runs every section at tiny sizes (a Docker devstack, noop devstacks, a small
file through kubo) and checks that the JSON holds numbers for each section and that the plot exists.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


@pytest.mark.integration
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # a bound, not a goal: under other sessions' load the smoke run takes 3 min
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "ratio" in done.stdout  # the table
    results = json.loads(out.read_text())
    assert (tmp_path / "bench.png").stat().st_size > 10_000

    machine = results["meta"]["machine"]
    assert machine["cpu_count"] >= 1
    assert all(machine[k] for k in ("python", "docker", "kubo", "nats_server", "bacq_commit"))

    for concurrency in ("c1", "c3"):
        section = results["overhead"][concurrency]
        for who in ("bacq", "docker"):
            assert section[who]["n"] == 2
            assert all(_number(section[who][k]) and section[who][k] > 0 for k in ("p50", "p95"))
        assert _number(section["ratio_p50"])

    throughput = results["throughput"]
    assert throughput["bacq"]["accepted"] == throughput["jobs"]
    assert _number(throughput["bacq"]["jobs_per_s"])
    assert _number(throughput["docker"]["jobs_per_s"])
    assert _number(throughput["ratio"])

    for concurrency in ("c1", "c3"):
        batch = results["orchestration"][concurrency]
        assert batch["accepted"] == batch["jobs"], batch
        assert batch["lost"] == 0
        assert batch["accepted_twice"] == 0
        assert _number(batch["jobs_per_s"])
        assert _number(batch["latency"]["p95"])
        # messages per job from nats-server's /varz, CPU ms per job of each process
        assert batch["nats_per_job"]["in_msgs"] > 1
        assert batch["nats_per_job"]["out_msgs"] > 1
        assert batch["nats_per_job"]["js_api_calls"] > 0
        cpu = batch["cpu_ms_per_job"]
        assert {"requester", "verifier", "nats-server", "w1", "bench (client)"} <= set(cpu)
        assert cpu["requester"] > 0

    runs = results["scale"]["runs"]
    assert {(r["workers"], r["jobs"]) for r in runs} == {(1, 10), (2, 10), (2, 20), (2, 40)}
    for run in runs:
        assert run["accepted"] == run["jobs"], run
        assert run["lost"] == 0
        assert run["accepted_twice"] == 0
        assert _number(run["jobs_per_s"])
        assert run["memory"]["requester"] > 0
        assert run["memory"]["worker_max"] > 0
    # the larger job counts are submitted in bulk (smoke: --bulk-from 20), as 100,000 are
    assert {r["jobs"]: r["submission"] for r in runs if r["big"]} == {20: "bulk", 40: "bulk"}

    data = results["data"]
    for key in (
        "ipfs_add",
        "ipfs_get",
        "ipfs_get_result",
        "bacq_add",
        "bacq_run",
        "bacq_get",
        "bacq_total",
        "api_add",
        "api_get",
    ):
        assert _number(data[key]["p50"])
        assert data[key]["p50"] > 0
    assert _number(data["ratio_total_p50"])

    startup = results["cli"]["startup"]
    for command in ("python", "version", "help", "run_no_wait"):
        assert startup[command]["n"] == 2
        assert _number(startup[command]["p50"])
    loop = results["cli"]["loop"]
    assert loop["states"] == {"accepted": loop["jobs"]}
    assert _number(loop["ratio"])
    bulk = results["bulk"]
    for form in ("yaml_file", "json_lines_stdin"):
        assert bulk[form]["states"] == {"accepted": bulk["jobs"]}
        assert _number(bulk[form]["jobs_per_s"])

    assert results["summary"]
    assert all("measure" in row for row in results["summary"])
    # every goal of issue 11 is a row with its target and a verdict
    goals = {row["key"]: row for row in results["summary"] if row["target"]}
    for key in (
        "cli.version",
        "cli.help",
        "cli.run_no_wait",
        "overhead.c1.cli.p50",
        "overhead.c1.client.p50",
        "cli.loop",
        "bulk.yaml_file",
        "orchestration.c1.rate",
        "orchestration.c3.rate",
        "scale.2w.40",
        "scale.memory_growth",
        "data.bacq_add",
        "data.bacq_get",
    ):
        assert goals[key]["met"] in (True, False), key
    markdown = (tmp_path / "bench.md").read_text()
    assert "| measure |" in markdown
    assert markdown.count("\n|") >= len(results["summary"]) + 1
