"""``python -m bench``: measure bacq against raw Docker and kubo in one run, print a table of
ratios, write the raw numbers as JSON and a PNG.

Sections (``--only`` picks some):

- ``overhead``: wall time of ``bacq run`` (the CLI) against ``docker run --rm`` with the same
  limits, interleaved, at concurrency 1 and at concurrency 3 with deterministic verification
  (baseline: 3 raw runs started at once, until the slowest ends).
- ``throughput``: N jobs submitted at once to 3 Docker workers of 2 slots each, against N raw
  ``docker run``s in a pool of 6 threads.
- ``orchestration``: M jobs at once through 3 ``--executor noop`` workers (no containers):
  submit → bid → accept → result → verify → final; concurrency 1 and 3.
- ``scale``: the same (concurrency 1) with several worker counts and job counts, with the peak
  memory of the requester, the verifier and the workers; accepted / failed / lost counts.
- ``data``: a random file into a job (input CID) and back (output folder), against ``ipfs add``
  and ``ipfs get`` with the kubo CLI.
- ``cli``: start-up of ``bacq version``, ``bacq --help`` and ``bacq run --no-wait`` (to the
  printed id); N ``bacq run --no-wait`` from a shell loop, then awaited, against N sequential
  ``docker run``.
- ``bulk``: ``bacq create -f`` of many noop jobs (a YAML list file, JSON lines on stdin): jobs/s.
- ``wasm``: the same trivial job (print hello) as a Docker, a wasm and a Python job through the
  CLI, interleaved, on the Docker devstack (its workers run wasm jobs too).
- ``wasm_orchestration``: K trivial wasm jobs at once through 3 ``--executor wasm`` workers.

Touches: devstacks it starts and stops (local nats-server, kubo, bacq services), the local Docker
daemon, a scratch directory under the system temp dir, and the output files (JSON and PNG).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from bacq.devstack import Devstack
from bench import cli_sections, docker_sections, noop_sections, report, wasm_sections
from bench.common import compile_bacq, console, machine_info, say

SECTIONS = (
    "overhead",
    "throughput",
    "orchestration",
    "scale",
    "data",
    "cli",
    "bulk",
    "wasm",
    "wasm_orchestration",
)
DOCKER_SECTIONS = ("overhead", "throughput", "data", "cli", "wasm")
DEFAULT_OUT = Path("bench/results/latest.json")

# the sizes, and the smoke sizes (CI: checks that the harness works, in well under 2 min)
FULL = {
    "runs": 20,
    "jobs": 30,
    "noop_jobs": 2000,
    "scale_jobs": [1000, 10000, 100000],
    "scale_workers": [1, 10, 50],
    "scale_big_workers": 10,
    "data_mb": 100,
    "data_runs": 3,
    "stall": 120.0,
    "cli_runs": 10,
    "loop_jobs": 20,
    "bulk_jobs": 10000,
    "bulk_from": 10000,
    "wasm_jobs": 300,
    "wasm_runs": 20,
}
SMOKE = {
    "runs": 2,
    "jobs": 4,
    "noop_jobs": 20,
    "scale_jobs": [10, 20, 40],
    "scale_workers": [1, 2],
    "scale_big_workers": 2,
    "data_mb": 2,
    "data_runs": 1,
    "stall": 60.0,
    "cli_runs": 2,
    "loop_jobs": 3,
    "bulk_jobs": 50,
    "bulk_from": 20,
    "wasm_jobs": 10,
    "wasm_runs": 1,
}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers, e.g. 1,10,50")
    return values


def _sections(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown) or text!r}; choose from {', '.join(SECTIONS)}"
        )
    return chosen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark bacq against raw docker run and the kubo CLI; print a table of "
        "ratios, write the raw numbers as JSON and a plot as PNG. Without flags: the full sizes "
        "of the issue (takes a while); --smoke: tiny sizes (under 2 minutes).",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness works")
    p.add_argument(
        "--only",
        type=_sections,
        default=list(SECTIONS),
        metavar="LIST",
        help=f"comma-separated sections to run ({','.join(SECTIONS)}; default: all)",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON file (default: {DEFAULT_OUT})"
    )
    p.add_argument("--plot", type=Path, help="PNG file (default: the JSON's path with .png)")
    p.add_argument(
        "--markdown",
        type=Path,
        help="the table as Markdown (default: the JSON's path with .md; docs/benchmarks.md "
        "includes bench/issue11.md, one of them)",
    )
    p.add_argument(
        "--before",
        type=Path,
        help="the JSON of an earlier run (e.g. docs/bench/final.json): its figures in a "
        "before column, row by row",
    )
    size = p.add_argument_group("sizes (defaults: the issue's; --smoke makes them tiny)")
    size.add_argument("--runs", type=int, help="overhead: runs per concurrency (20)")
    size.add_argument("--jobs", type=int, help="throughput: Docker jobs submitted at once (30)")
    size.add_argument(
        "--noop-jobs", type=int, help="orchestration: noop jobs submitted at once (2000)"
    )
    size.add_argument(
        "--scale-jobs",
        type=_ints,
        help="scale: job counts; the first at every worker count, the rest at "
        "--scale-big-workers (1000,10000,100000; from 10,000 on submitted in bulk)",
    )
    size.add_argument("--scale-workers", type=_ints, help="scale: worker counts (1,10,50)")
    size.add_argument(
        "--scale-big-workers", type=int, help="scale: workers for the larger job counts (10)"
    )
    size.add_argument("--data-mb", type=int, help="data: MiB of the file in and out (100)")
    size.add_argument("--data-runs", type=int, help="data: repetitions (3)")
    size.add_argument("--cli-runs", type=int, help="cli: start-up runs of each command (10)")
    size.add_argument(
        "--loop-jobs", type=int, help="cli: bacq run --no-wait jobs of the shell loop (20)"
    )
    size.add_argument("--bulk-jobs", type=int, help="bulk: jobs in the file (10000)")
    size.add_argument(
        "--bulk-from",
        type=int,
        help="orchestration, scale: from this many jobs on, a batch is submitted in bulk "
        "(Client.submit_many) rather than one request per job (10000)",
    )
    size.add_argument(
        "--wasm-jobs", type=int, help="wasm_orchestration: wasm jobs submitted at once (300)"
    )
    size.add_argument(
        "--wasm-runs", type=int, help="wasm: runs of each of the three trivial jobs (20)"
    )
    tune = p.add_argument_group("tuning")
    tune.add_argument("--max-jobs", type=int, default=64, help="job slots per noop worker (64)")
    tune.add_argument(
        "--wasm-max-jobs",
        type=int,
        default=4,
        help="job slots per wasm worker (4; each job is a child process)",
    )
    tune.add_argument(
        "--bid-timeout",
        type=float,
        help="bid_timeout of the benchmark's jobs (default: the spec's own). Before bacq had a "
        "job queue, --bid-timeout 600 let a job that found every slot taken wait for one "
        "instead of failing for want of bids",
    )
    tune.add_argument(
        "--stall",
        type=float,
        help="seconds without any job becoming final before the rest count as lost (120)",
    )
    tune.add_argument(
        "--submit-parallel", type=int, default=200, help="submissions in flight at once (200)"
    )
    tune.add_argument(
        "--state-dir",
        dest="state_root",
        type=Path,
        help="keep the devstacks' state and logs under this directory (default: temp, removed)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    profile = SMOKE if args.smoke else FULL
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.plot is None:
        args.plot = args.out.with_suffix(".png")
    if args.markdown is None:
        args.markdown = args.out.with_suffix(".md")
        if "docs" in args.out.resolve().parts:  # a .md there would be a page of the docs site
            args.markdown = DEFAULT_OUT.parent / args.out.with_suffix(".md").name
    if args.before is not None and not args.before.is_file():
        build_parser().error(f"--before {args.before}: no such file (a JSON of python -m bench)")
    return args


def _section(results: dict[str, Any], name: str, func: Callable[[], Any]) -> None:
    started = time.monotonic()
    say(f"[bold]== {name}[/]")
    try:
        results[name] = func()
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
        console.print(f"[red]{name} failed[/]: {traceback.format_exc()}")
    if isinstance(results[name], dict):
        results[name]["section_seconds"] = round(time.monotonic() - started, 2)
    say(f"{name}: done in {time.monotonic() - started:.0f}s")


def _write(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (and SIGINT even when started in the background, where a shell ignores it) stop
    # the run through the finally blocks, so that no devstack is left behind
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    started = time.monotonic()
    if args.state_root is not None:
        args.state_root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "meta": {
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "smoke": args.smoke,
            "sections": args.only,
            "argv": sys.argv[1:] if argv is None else argv,
            "sizes": {k: getattr(args, k) for k in FULL},
            "tuning": {
                "max_jobs": args.max_jobs,
                "bid_timeout": args.bid_timeout,
                "submit_parallel": args.submit_parallel,
            },
            "machine": machine_info(),
        }
    }
    say(f"machine: {results['meta']['machine']}")
    compile_bacq()  # bytecode caches, as an installed bacq has them
    chosen = [s for s in SECTIONS if s in args.only]

    if any(s in chosen for s in DOCKER_SECTIONS):
        say("starting the Docker devstack: 3 workers (2 slots each), 2 kubo nodes")
        t = time.monotonic()
        stack = Devstack(
            workers=3,
            kubo_nodes=2,
            max_jobs=2,
            state_dir=args.state_root / "docker" if args.state_root else None,
        )
        try:
            stack.start()
            say(f"  up in {time.monotonic() - t:.1f}s")
            if "overhead" in chosen:
                _section(results, "overhead", lambda: docker_sections.overhead(stack, args.runs))
                _write(results, args.out)
            if "throughput" in chosen:
                _section(
                    results,
                    "throughput",
                    lambda: docker_sections.throughput(stack, args.jobs, 6, args.bid_timeout),
                )
                _write(results, args.out)
            if "data" in chosen:
                _section(
                    results,
                    "data",
                    lambda: docker_sections.data(stack, args.data_mb, args.data_runs),
                )
                _write(results, args.out)
            if "cli" in chosen:
                _section(
                    results, "cli", lambda: cli_sections.cli(stack, args.cli_runs, args.loop_jobs)
                )
                _write(results, args.out)
            if "wasm" in chosen:
                _section(results, "wasm", lambda: wasm_sections.engines(stack, args.wasm_runs))
                _write(results, args.out)
        except Exception as exc:
            for name in DOCKER_SECTIONS:
                if name in chosen and name not in results:
                    results[name] = {"error": f"devstack: {type(exc).__name__}: {exc}"[:4000]}
            console.print(f"[red]Docker devstack failed[/]: {traceback.format_exc()}")
        finally:
            stack.stop()
    if "orchestration" in chosen:
        _section(results, "orchestration", lambda: noop_sections.orchestration(args))
        _write(results, args.out)
    if "scale" in chosen:
        _section(results, "scale", lambda: noop_sections.scale(args))
        _write(results, args.out)
    if "bulk" in chosen:
        _section(results, "bulk", lambda: cli_sections.bulk(args))
        _write(results, args.out)
    if "wasm_orchestration" in chosen:
        _section(results, "wasm_orchestration", lambda: wasm_sections.orchestration(args))
        _write(results, args.out)

    results["meta"]["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["meta"]["loadavg_at_end"] = os.getloadavg()
    table_rows = report.rows(results)
    results["summary"] = table_rows
    _write(results, args.out)
    if args.before is not None:
        table_rows = report.with_before(table_rows, json.loads(args.before.read_text()))
        results["meta"]["before"] = str(args.before)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(report.markdown(table_rows, f"*{report.title_of(results)}*"))
    try:
        report.plot(results, args.plot)
    except Exception as exc:
        console.print(f"[red]plot failed[/]: {exc!r} (pip install -e '.[dev]' adds matplotlib)")
        results["meta"]["plot_error"] = repr(exc)
        _write(results, args.out)
    out = Console(highlight=False, width=160 if not sys.stdout.isatty() else None)
    report.print_table(
        table_rows,
        out,
        title=f"bacq benchmark{' (smoke sizes)' if args.smoke else ''}: "
        f"{results['meta']['seconds']:.0f}s on {os.cpu_count()} CPUs",
    )
    out.print(f"raw numbers: {args.out}   plot: {args.plot}   markdown: {args.markdown}")
    failed = [s for s in chosen if isinstance(results.get(s), dict) and "error" in results[s]]
    failed += [
        f"scale {r['workers']}wx{r['jobs']}"
        for r in (results.get("scale") or {}).get("runs", [])
        if "error" in r
    ]
    if failed or "plot_error" in results["meta"]:
        console.print(f"[red]incomplete:[/] {', '.join(failed) or 'plot'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
