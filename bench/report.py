"""The summary table (rich) and the plot (matplotlib) of a benchmark run. Touches its output files.

Every row: the measure, bacq's figure, the baseline's, their ratio, the target and whether it is
met. Times are seconds, throughputs jobs/s, memory MiB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

Row = dict[str, Any]


def _row(
    measure: str,
    bacq: float | None,
    baseline: float | None = None,
    *,
    unit: str = "",
    ratio: float | None = None,
    target: str = "",
    met: bool | None = None,
    key: str = "",
) -> Row:
    return {
        "key": key or measure,  # stable across runs: a "before" run's row is found by it
        "measure": measure,
        "bacq": bacq,
        "baseline": baseline,
        "unit": unit,
        "ratio": ratio,
        "target": target,
        "met": met,
    }


def _le(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _ge(value: float | None, limit: float) -> bool | None:
    return None if value is None else value >= limit


def rows(results: dict[str, Any]) -> list[Row]:
    """The summary rows of whatever sections ``results`` holds."""
    out: list[Row] = []
    ov = results.get("overhead") or {}
    for c, what in (("c1", "concurrency 1"), ("c3", "concurrency 3, deterministic")):
        sec = ov.get(c)
        if not sec:
            continue
        for q in ("p50", "p95"):
            r = sec[f"ratio_{q}"]
            goal = c == "c1" and q == "p50"  # issue 11: bacq run ≤ 1.6x docker run
            out.append(
                _row(
                    f"bacq run (waiting) vs docker run --rm --network none, {what}, {q}",
                    sec["bacq"][q],
                    sec["docker"][q],
                    unit="s",
                    ratio=r,
                    target="≤ 1.60x" if goal else "",
                    met=_le(r, 1.60) if goal else None,
                    key=f"overhead.{c}.cli.{q}",
                )
            )
    for c in ("c1", "c3"):
        sec = ov.get(c)
        if sec and sec.get("bacq_client", {}).get("p50") is not None:
            r = _ratio(sec["bacq_client"]["p50"], sec["docker"]["p50"])
            goal = c == "c1"  # issue 11: the Python client's path ≤ 1.10x
            out.append(
                _row(
                    f"  same job via Python client (no CLI), concurrency {c[1:]}, p50",
                    sec["bacq_client"]["p50"],
                    sec["docker"]["p50"],
                    unit="s",
                    ratio=r,
                    target="≤ 1.10x" if goal else "",
                    met=_le(r, 1.10) if goal else None,
                    key=f"overhead.{c}.client.p50",
                )
            )
    if ov.get("cli_startup"):
        startup = ov["cli_startup"]["p50"]
        out.append(_row("  bacq CLI start-up (bacq version), p50", startup, unit="s"))
    tp = results.get("throughput") or {}
    if "bacq" in tp:
        out.append(
            _row(
                f"Docker throughput, {tp['jobs']} jobs, {tp['slots']} slots",
                tp["bacq"]["jobs_per_s"],
                tp["docker"]["jobs_per_s"],
                unit="jobs/s",
                ratio=tp["ratio"],
                target="≥ 0.90x",
                met=_ge(tp["ratio"], 0.90),
            )
        )
    orch = results.get("orchestration") or {}
    for c in ("c1", "c3"):
        sec = orch.get(c)
        if not sec:
            continue
        conc = c[1:]
        goal = 1000 if conc == "1" else 400  # issue 11, on 2 cores
        counts = f"accepted {sec['accepted']}, failed {sec['failed']}, lost {sec['lost']}"
        out.append(
            _row(
                f"orchestration only (noop), concurrency {conc}"
                f"{', deterministic' if conc == '3' else ''}, {sec['jobs']} jobs ({counts})",
                sec["jobs_per_s"],
                unit="jobs/s",
                target=f"≥ {goal} jobs/s, none lost",
                met=None
                if sec["jobs_per_s"] is None
                else sec["jobs_per_s"] >= goal and sec["lost"] == 0,
                key=f"orchestration.{c}.rate",
            )
        )
        out.append(
            _row(
                f"  latency submit→final, concurrency {conc}, p50 / p95",
                sec["latency"]["p50"],
                sec["latency"]["p95"],
                unit="s",
                key=f"orchestration.{c}.latency",
            )
        )
        out.extend(_cost_rows(sec, f"orchestration.{c}", f"concurrency {conc}"))
    wasm = results.get("wasm") or {}
    docker_p50 = (wasm.get("docker") or {}).get("p50")
    for name, what in (("wasm", "trivial wasm job"), ("python", "trivial Python job (wasm)")):
        sec = wasm.get(name)
        if not sec:
            continue
        out.append(
            _row(
                f"{what} vs the same Docker job, bacq create --wait, p50",
                sec["p50"],
                docker_p50,
                unit="s",
                ratio=_ratio(sec["p50"], docker_p50),
            )
        )
    wo = results.get("wasm_orchestration") or {}
    if "jobs_per_s" in wo:
        counts = f"accepted {wo['accepted']}, failed {wo['failed']}, lost {wo['lost']}"
        out.append(
            _row(
                f"orchestration with the wasm executor, {wo['jobs']} jobs ({counts})",
                wo["jobs_per_s"],
                unit="jobs/s",
            )
        )
    out.extend(_scale_rows(results.get("scale") or {}))
    data = results.get("data") or {}
    if "bacq_total" in data:
        mb = data["megabytes"]
        for bacq_key, base_key, what, goal in (
            ("bacq_add", "ipfs_add", "`bacq ipfs add` vs `ipfs add`", 1.3),
            ("api_add", "ipfs_add", "Storage.add (API, no CLI start-up) vs `ipfs add`", None),
            ("bacq_run", None, "job (fetch input, cp, publish output)", None),
            ("bacq_get", "ipfs_get_result", "`bacq get` vs `ipfs get` of the result", 1.3),
            ("bacq_get", "ipfs_get", "  `bacq get` vs `ipfs get` of the file (same node)", None),
            ("api_get", "ipfs_get", "Storage.fetch (API, no CLI start-up) vs `ipfs get`", None),
        ):
            if bacq_key not in data or (base_key and base_key not in data):
                continue  # (a run before ipfs_get_result was measured)
            base = data[base_key]["p50"] if base_key else None
            share = _ratio(data[bacq_key]["p50"], base)
            out.append(
                _row(
                    f"data {mb} MiB: {what}, p50",
                    data[bacq_key]["p50"],
                    base,
                    unit="s",
                    ratio=share,
                    target=f"≤ {goal:.2f}x" if goal else "",
                    met=_le(share, goal) if goal else None,
                    key=f"data.{bacq_key}" + ("" if goal or not base_key else f".{base_key}"),
                )
            )
        out.append(
            _row(
                f"data {mb} MiB: total in + out, p50",
                data["bacq_total"]["p50"],
                data["baseline_total"]["p50"],
                unit="s",
                ratio=data["ratio_total_p50"],
                key="data.total",
            )
        )
    out.extend(_cli_rows(results))
    for name in ("overhead", "throughput", "orchestration", "scale", "data", "cli", "bulk"):
        sec = results.get(name)
        if isinstance(sec, dict) and "error" in sec:
            out.append(
                _row(
                    f"{name}: section failed",
                    None,
                    target=sec["error"][:60],
                    met=False,
                    key=f"{name}.failed",
                )
            )
    return out


def _cost_rows(sec: dict[str, Any], key: str, what: str) -> list[Row]:
    """CPU ms per job of each process, and nats-server's messages per job, of a noop batch."""
    out: list[Row] = []
    cpu = sec.get("cpu_ms_per_job") or {  # a run before these were written: CPU seconds
        k: 1000 * v / sec["jobs"] for k, v in (sec.get("cpu_seconds") or {}).items() if sec["jobs"]
    }
    if cpu:
        workers = sum(v for k, v in cpu.items() if k.startswith("w") and k[1:].isdigit())
        named = [("requester", "requester"), ("verifier", "verifier"), ("nats-server", "nats")]
        parts = [f"{label} {cpu[name]:.2f}" for name, label in named if name in cpu]
        parts.append(f"workers {workers:.2f}")
        if "bench (client)" in cpu:
            parts.append(f"bench client {cpu['bench (client)']:.2f}")
        total = sum(v for k, v in cpu.items() if not k.startswith("kubo"))
        out.append(
            _row(
                f"  CPU ms per job, {what}: " + ", ".join(parts),
                total,
                unit="ms/job (all)",
                key=f"{key}.cpu",
            )
        )
        out.append(
            _row(
                f"  requester CPU ms per job, {what}",
                cpu.get("requester"),
                unit="ms/job",
                key=f"{key}.cpu.requester",
            )
        )
    nats = sec.get("nats_per_job") or {}
    if nats:
        out.append(
            _row(
                f"  NATS messages per job, {what}: in / out "
                f"({nats.get('js_api_calls', 0):.1f} JetStream API calls)",
                nats.get("in_msgs"),
                nats.get("out_msgs"),
                unit="msgs/job",
                key=f"{key}.msgs",
            )
        )
    return out


def _scale_rows(scale: dict[str, Any]) -> list[Row]:
    """A row per run (rate, counts); the larger job counts must all be accepted, none lost or
    accepted twice; the requester's peak memory across them must grow no faster than linearly."""
    out: list[Row] = []
    big_runs = []
    for run in scale.get("runs", []):
        name = f"scale: {run['workers']} workers, {run['jobs']} jobs"
        key = f"scale.{run['workers']}w.{run['jobs']}"
        big = run.get("big", run["jobs"] >= 10_000)
        if "error" in run:
            out.append(_row(name, None, target=run["error"][:60], met=False, key=key))
            continue
        twice = run.get("accepted_twice")
        counts = f"accepted {run['accepted']}, failed {run['failed']}, lost {run['lost']}"
        if twice is not None:
            counts += f", accepted twice {twice}"
        if run["submit_errors"]:
            counts += f", not submitted {run['submit_errors']}"
        if run.get("submission") == "bulk":
            counts += ", submitted in bulk"
        # noop jobs cannot fail on their own: every one should be accepted, exactly once
        out.append(
            _row(
                f"{name} ({counts})",
                run["jobs_per_s"],
                unit="jobs/s",
                target="all accepted once, none lost" if big else "",
                met=(run["accepted"] == run["jobs"] and run["lost"] == 0 and not twice)
                if big
                else None,
                key=key,
            )
        )
        mem = run["memory"]
        out.append(
            _row(
                "  peak RSS: requester / worker max (mean)",
                _mib(mem["requester"]),
                _mib(mem["worker_max"]),
                unit=f"MiB (mean {(_mib(mem['worker_mean']) or 0):.0f})",
                key=f"{key}.memory",
            )
        )
        if big:
            out.extend(_cost_rows(run, key, f"{run['jobs']} jobs"))
            if mem.get("requester"):
                big_runs.append(run)
    if len(big_runs) >= 2:
        small, large = sorted(big_runs, key=lambda r: r["jobs"])[-2:]
        grew = _ratio(large["memory"]["requester"], small["memory"]["requester"])
        jobs = large["jobs"] / small["jobs"]
        out.append(
            _row(
                f"scale: the requester's peak RSS, {small['jobs']} → {large['jobs']} jobs "
                f"(jobs x{jobs:g})",
                _mib(large["memory"]["requester"]),
                _mib(small["memory"]["requester"]),
                unit="MiB",
                ratio=grew,
                target=f"≤ {jobs:g}x (linear)",
                met=None if grew is None else grew <= jobs,
                key="scale.memory_growth",
            )
        )
    return out


def _cli_rows(results: dict[str, Any]) -> list[Row]:
    """Start-up of the quick commands (against ``python -c pass``), the shell loop against
    sequential ``docker run``, and the bulk submission rate."""
    out: list[Row] = []
    cli = results.get("cli") or {}
    startup = cli.get("startup") or {}
    floor = (startup.get("python") or {}).get("p50")
    for key, what, limit in (
        ("version", "bacq version", 0.10),
        ("help", "bacq --help", 0.10),
        ("run_no_wait", "bacq run --no-wait, to the printed id", 0.20),
    ):
        sec = startup.get(key)
        if sec:
            out.append(
                _row(
                    f"start-up: {what}, p50 (baseline: python -c pass)",
                    sec["p50"],
                    floor,
                    unit="s",
                    ratio=_ratio(sec["p50"], floor),
                    target=f"≤ {limit:.2f} s",
                    met=_le(sec["p50"], limit),
                    key=f"cli.{key}",
                )
            )
    loop = cli.get("loop")
    if loop:
        out.append(
            _row(
                f"{loop['jobs']} x bacq run --no-wait from a shell loop, then awaited, vs "
                f"{loop['jobs']} sequential docker run",
                loop["bacq_seconds"],
                loop["docker_seconds"],
                unit="s",
                ratio=loop["ratio"],
                target="< 1.00x",
                met=None if loop["ratio"] is None else loop["ratio"] < 1.0,
                key="cli.loop",
            )
        )
    bulk = results.get("bulk") or {}
    for key, what in (("yaml_file", "a YAML list file"), ("json_lines_stdin", "JSON lines, stdin")):
        sec = bulk.get(key)
        if sec:
            out.append(
                _row(
                    f"bulk submission: bacq create -f, {bulk['jobs']} jobs, {what}",
                    sec["jobs_per_s"],
                    unit="jobs/s",
                    target="≥ 2000 jobs/s",
                    met=_ge(sec["jobs_per_s"], 2000),
                    key=f"bulk.{key}",
                )
            )
    return out


def _mib(value: float | None) -> float | None:
    return None if value is None else value / 1024**2


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def with_before(table_rows: list[Row], before: dict[str, Any] | None) -> list[Row]:
    """``table_rows`` with each row's figure in a ``before`` run (its raw sections read by this
    code, the rows matched by key) as ``before`` (None where that run has no such row)."""
    if before is None:
        return table_rows
    earlier = {row["key"]: row for row in rows(before)}
    out = []
    for row in table_rows:
        match = earlier.get(row["key"])
        out.append(
            {
                **row,
                "before": None if match is None else match["bacq"],
                "before_ratio": None if match is None else match["ratio"],
            }
        )
    return out


def _cells(row: Row, before: bool) -> list[str]:
    cells = [
        row["measure"],
        _fmt(row["bacq"]),
        _fmt(row["baseline"]),
        row["unit"],
        "—" if row["ratio"] is None else f"{row['ratio']:.2f}x",
    ]
    if before:
        shown = _fmt(row.get("before"))
        if row.get("before_ratio") is not None:
            shown += f" ({row['before_ratio']:.2f}x)"
        cells.append(shown)
    return [*cells, row["target"]]


def print_table(table_rows: list[Row], console: Console, title: str) -> None:
    before = any("before" in row for row in table_rows)
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("bacq", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("unit")
    table.add_column("ratio", justify="right")
    if before:
        table.add_column("before", justify="right")
    table.add_column("target")
    table.add_column("met?", justify="center")
    for row in table_rows:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[row["met"]]
        table.add_row(*_cells(row, before), met)
    console.print(table)


def markdown(table_rows: list[Row], title: str) -> str:
    """The table as Markdown (docs/benchmarks.md includes such a file)."""
    before = any("before" in row for row in table_rows)
    head = ["measure", "bacq", "baseline", "unit", "ratio", *(["before"] if before else [])]
    head += ["target", "met"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table_rows:
        cells = [c.replace("|", "\\|") for c in _cells(row, before)]
        cells.append({True: "yes", False: "**no**", None: ""}[row["met"]])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def title_of(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    commit = str(machine.get("bacq_code_commit") or machine.get("bacq_commit") or "?")[:10]
    return (
        f"bacq benchmark{' (smoke sizes)' if meta.get('smoke') else ''}: bacq {commit}, "
        f"{meta.get('started', '?')}, {meta.get('seconds', 0):.0f} s on "
        f"{machine.get('cpu_count', '?')} CPUs"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report RESULTS.json [--before BEFORE.json] [--markdown OUT.md]``: the
    table of a run again (read from its JSON), beside a before run, as text or Markdown."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("results", type=Path, help="a JSON file written by python -m bench")
    parser.add_argument("--before", type=Path, help="an earlier run's JSON: a before column")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    before = json.loads(args.before.read_text()) if args.before else None
    table_rows = with_before(rows(results), before)
    if args.markdown:
        args.markdown.write_text(markdown(table_rows, f"*{title_of(results)}*"))
    print_table(table_rows, Console(highlight=False, width=200), title_of(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def plot(results: dict[str, Any], path: Path) -> None:
    """Two panels: noop throughput against workers (one line per job count), and the latency
    distributions of bacq run and docker run at concurrency 1 and 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    by_jobs: dict[int, list[tuple[int, float]]] = {}
    for run in (results.get("scale") or {}).get("runs", []):
        if run.get("jobs_per_s"):
            by_jobs.setdefault(run["jobs"], []).append((run["workers"], run["jobs_per_s"]))
    for jobs, points in sorted(by_jobs.items()):
        points.sort()
        left.plot(
            [p[0] for p in points], [p[1] for p in points], marker="o", label=f"{jobs:,} jobs"
        )
    orch = results.get("orchestration") or {}
    for c, marker, color in (("c1", "s", "black"), ("c3", "^", "grey")):
        sec = orch.get(c)
        if sec and sec.get("jobs_per_s"):
            left.scatter(
                [sec["workers"]],
                [sec["jobs_per_s"]],
                marker=marker,
                color=color,
                label=f"orchestration, concurrency {c[1:]}, {sec['jobs']:,} jobs",
            )
    left.set_xscale("log")
    ticks = sorted({p[0] for points in by_jobs.values() for p in points})
    if ticks:
        left.set_xticks(ticks, [str(t) for t in ticks])
        left.minorticks_off()
    left.set_xlabel("noop workers")
    left.set_ylabel("jobs/s (submit → final)")
    left.set_title("Orchestration-only throughput")
    left.grid(True, alpha=0.3)
    if left.has_data():
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no scale data", ha="center", transform=left.transAxes)

    ov = results.get("overhead") or {}
    series, labels = [], []
    for c in ("c1", "c3"):
        sec = ov.get(c)
        if not sec:
            continue
        for who in ("bacq", "docker"):
            if sec[who]["samples"]:
                series.append(sec[who]["samples"])
                labels.append(f"{'bacq run' if who == 'bacq' else 'docker run'}\nconc. {c[1:]}")
    if series:
        right.boxplot(series, showfliers=True)
        right.set_xticks(range(1, len(labels) + 1), labels)
    else:
        right.text(0.5, 0.5, "no overhead data", ha="center", transform=right.transAxes)
    right.set_ylabel("wall time per job (s)")
    right.set_title("Per-job wall time: bacq run vs docker run")
    right.grid(True, axis="y", alpha=0.3)
    meta = results.get("meta", {}).get("machine", {})
    fig.suptitle(
        f"bacq {str(meta.get('bacq_code_commit') or meta.get('bacq_commit', '?'))[:10]} "
        f"on {meta.get('cpu_count', '?')} CPUs"
        f"{' (smoke sizes)' if results.get('meta', {}).get('smoke') else ''}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
