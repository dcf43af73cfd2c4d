"""The ``bacq`` command: the user's entry to everything (client commands, services, devstack).

Touches what its subcommands touch: NATS and kubo for client commands, Docker for workers, local
processes for ``devstack``. User errors print one line (what went wrong, what to do) and exit
non-zero; ``--debug`` shows the traceback.

Exit codes: 0 the job was accepted (and its command exited 0) or the command succeeded;
1 the job failed, was void or cancelled, or an operation failed; 2 bad usage or an invalid spec;
3 the job was accepted but its command exited non-zero; 130 interrupted (a waited-on job goes on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bacq import __version__, _audit
from bacq.bus import DEFAULT_NATS_URL, Bus
from bacq.client import Client
from bacq.errors import BacqError, ConfigError, SpecError
from bacq.log import configure as configure_logging
from bacq.models import JobRecord
from bacq.spec import json_schema, parse_memory, parse_spec
from bacq.states import ExecState, JobState
from bacq.storage import DEFAULT_IPFS_API, Storage

__all__ = ["main"]

SERVICE_CONNECT_WAIT = 60.0  # seconds a service waits for NATS at start (it may be starting too)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_COMMAND_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# piped output is not cut to 80 columns: ids and CIDs stay whole for the next program
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class UsageError(BacqError):
    """A command-line argument is malformed (exit 2)."""


# -- argument helpers ------------------------------------------------------------------------------
def _pair(text: str, sep: str, what: str, example: str) -> tuple[str, str]:
    left, found, right = text.partition(sep)
    if not found or not left or not right:
        raise UsageError(f"{what} {text!r} must look like {example}")
    return left, right


def _key_values(items: list[str], what: str) -> dict[str, str]:
    return dict(_pair(item, "=", what, "KEY=VALUE") for item in items)


def nats_url(args: argparse.Namespace) -> str:
    return str(args.nats or os.environ.get("BACQ_NATS_URL") or DEFAULT_NATS_URL)


def ipfs_api(args: argparse.Namespace) -> str:
    return str(args.ipfs or os.environ.get("BACQ_IPFS_API") or DEFAULT_IPFS_API)


def _spec_from_run_args(args: argparse.Namespace) -> dict[str, Any]:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    inputs = []
    for volume in args.input:
        cid, path = _pair(volume, ":", "input volume (-v)", "CID:/path/in/container")
        inputs.append({"cid": cid, "path": path})
    outputs = []
    for volume in args.output_volume:
        name, path = _pair(volume, ":", "output volume (-o)", "NAME:/path/in/container")
        outputs.append({"name": name, "path": path})
    spec: dict[str, Any] = {
        "image": args.image,
        "command": command,
        "inputs": inputs,
        "outputs": outputs,
        "env": _key_values(args.env, "environment variable (-e)"),
        "labels": _key_values(args.label, "label (--label)"),
        "node_selector": _key_values(args.select, "node selector (--select)"),
        "concurrency": args.concurrency,
        "confidence": args.confidence,
        "min_bids": args.min_bids,
        "verifier": args.verifier,
        "timeout": args.timeout,
        "bid_timeout": args.bid_timeout,
        "resources": {"cpu": args.cpu, "memory": args.memory},
    }
    if args.entrypoint is not None:
        spec["entrypoint"] = [args.entrypoint]
    if args.workdir is not None:
        spec["working_dir"] = args.workdir
    return spec


# -- rendering ---------------------------------------------------------------------------------
_STATE_STYLE = {
    JobState.ACCEPTED: "green",
    JobState.VOID: "yellow",
    JobState.FAILED: "red",
    JobState.CANCELLED: "yellow",
    ExecState.VERIFIED: "green",
    ExecState.REJECTED: "red",
    ExecState.FAILED: "red",
    ExecState.BID_REJECTED: "dim",
}


def _styled(state: str) -> str:
    style = _STATE_STYLE.get(state)  # type: ignore[call-overload]
    return f"[{style}]{state}[/]" if style else state


def _when(record_time: Any) -> str:
    return str(record_time.strftime("%Y-%m-%d %H:%M:%S"))


def _job_json(job: JobRecord) -> dict[str, Any]:
    return job.model_dump(mode="json")


def render_describe(job: JobRecord) -> None:
    spec = job.spec
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("Job", job.id)
    grid.add_row("State", _styled(job.state) + (f"  ({job.reason})" if job.reason else ""))
    grid.add_row("Image", spec.image)
    if spec.entrypoint:
        grid.add_row("Entrypoint", json.dumps(spec.entrypoint))
    grid.add_row("Command", json.dumps(spec.command))
    for volume in spec.inputs:
        grid.add_row("Input", f"{volume.cid} → {volume.path}")
    for output in spec.outputs:
        grid.add_row("Output", f"{output.name} ← {output.path}")
    grid.add_row(
        "Verification",
        f"{spec.verifier}, concurrency {spec.concurrency}, confidence {spec.confidence}"
        + (f", min_bids {spec.min_bids}" if spec.min_bids else ""),
    )
    grid.add_row(
        "Limits",
        f"cpu {spec.resources.cpu:g}, memory {spec.resources.memory} B, timeout {spec.timeout:g}s",
    )
    grid.add_row("Created", _when(job.created_at))
    grid.add_row("Updated", _when(job.updated_at))
    if job.result_cid:
        grid.add_row("Result", job.result_cid)
    if job.exit_code is not None:
        grid.add_row("Exit code", str(job.exit_code))
    out.print(grid)
    if job.executions:
        table = Table(title="Executions", title_justify="left", expand=False)
        for column in ("NODE", "STATE", "UPDATED", "EXIT", "RESULT CID", "DETAIL"):
            table.add_column(column, overflow="fold")
        for execution in sorted(job.executions.values(), key=lambda e: e.node_id):
            table.add_row(
                execution.node_id,
                _styled(execution.state),
                _when(execution.updated_at),
                "" if execution.exit_code is None else str(execution.exit_code),
                execution.result_cid or "",
                execution.error or execution.detail,
            )
        out.print(table)


def render_list(jobs: list[JobRecord]) -> None:
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "STATE", "IMAGE", "CREATED", "VERIFIED", "RESULT"):
        table.add_column(column, overflow="fold")
    for job in jobs:
        chosen = [
            e
            for e in job.executions.values()
            if e.state not in (ExecState.BID, ExecState.BID_REJECTED)
        ]
        verified = sum(1 for e in chosen if e.state == ExecState.VERIFIED)
        table.add_row(
            job.id,
            _styled(job.state),
            job.spec.image,
            _when(job.created_at),
            f"{verified}/{len(chosen)}",
            job.result_cid or "",
        )
    out.print(table)


# -- commands ----------------------------------------------------------------------------------
async def cmd_run(args: argparse.Namespace) -> int:
    spec = parse_spec(_spec_from_run_args(args))
    async with await Client.connect(nats_url(args)) as client:
        job_id = await client.submit(spec, idempotency_key=args.idempotency_key)
        if args.id_only or args.no_wait:
            print(job_id)
            return EXIT_OK
        if args.output != "json":
            err.print(
                f"job [bold]{job_id}[/] submitted; waiting (Ctrl-C detaches, the job goes on)"
            )
        seen: dict[str, str] = {}

        def progress(job: JobRecord) -> None:
            if args.output == "json":
                return
            if seen.get("") != job.state:
                seen[""] = job.state
                err.print(f"  job {_styled(job.state)}" + (f": {job.reason}" if job.reason else ""))
            for node, execution in sorted(job.executions.items()):
                if seen.get(node) != execution.state:
                    seen[node] = execution.state
                    note = execution.error or execution.detail
                    err.print(
                        f"  {node}: {_styled(execution.state)}" + (f" ({note})" if note else "")
                    )

        try:
            job = await client.wait(job_id, on_change=progress)
        except (KeyboardInterrupt, asyncio.CancelledError):
            err.print(f"detached; job {job_id} goes on: `bacq describe {job_id}`")
            return EXIT_INTERRUPTED
    if args.output == "json":
        print(json.dumps(_job_json(job), indent=2))
    else:
        _print_verdict(job)
    return _job_exit_code(job)


def _print_verdict(job: JobRecord) -> None:
    if job.state == JobState.ACCEPTED:
        out.print(f"[green]accepted[/]: {job.reason}")
        out.print(f"result CID: {job.result_cid}")
        if job.exit_code:
            out.print(f"[yellow]the command exited with code {job.exit_code}[/]")
        out.print(f"fetch it: bacq get {job.id} --output-dir {job.id}")
    else:
        out.print(f"{_styled(job.state)}: {job.reason}")
        out.print(f"details: bacq describe {job.id}")


def _job_exit_code(job: JobRecord) -> int:
    if job.state != JobState.ACCEPTED:
        return EXIT_FAILED
    return EXIT_COMMAND_FAILED if job.exit_code else EXIT_OK


async def cmd_list(args: argparse.Namespace) -> int:
    async with await Client.connect(nats_url(args)) as client:
        jobs = await client.jobs()
    jobs = jobs[: args.n] if args.n else jobs
    if args.output == "json":
        print(json.dumps([_job_json(j) for j in jobs], indent=2))
    elif not jobs:
        err.print("no jobs yet; submit one with `bacq run`")
    else:
        render_list(jobs)
    return EXIT_OK


async def cmd_describe(args: argparse.Namespace) -> int:
    async with await Client.connect(nats_url(args)) as client:
        job = await client.job(args.job_id)
    if args.output == "json":
        print(json.dumps(_job_json(job), indent=2))
    else:
        render_describe(job)
    return EXIT_OK


async def cmd_get(args: argparse.Namespace) -> int:
    async with await Client.connect(nats_url(args)) as client:
        job = await client.job(args.job_id)
        target = Path(args.output_dir or job.id)
        storage = await Storage.connect(ipfs_api(args), timeout=args.timeout)
        try:
            await client.fetch_results(storage, job, target)
        finally:
            await storage.close()
    err.print(
        f"results of {job.id} in {target}/ (stdout, stderr, exitCode"
        + "".join(f", {o.name}/" for o in job.spec.outputs)
        + ")"
    )
    return EXIT_OK


async def cmd_ipfs_add(args: argparse.Namespace) -> int:
    storage = await Storage.connect(ipfs_api(args))
    try:
        for path in args.paths:
            print(await storage.add(Path(path)))
    finally:
        await storage.close()
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


async def _with_client(func: Any, args: argparse.Namespace) -> int:
    async with await Client.connect(nats_url(args)) as client:
        return int(await func(args, client, out))


# -- services ------------------------------------------------------------------------------------
async def _serve(run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(stop)
    return EXIT_OK


async def cmd_requester(args: argparse.Namespace) -> int:
    from bacq.requester.service import Requester, RequesterConfig

    config = RequesterConfig(
        result_grace=args.result_grace,
        lost_after=args.lost_after,
        verify_timeout=args.verify_timeout,
        events_max_age=args.events_max_age * 86400,
        events_max_bytes=int(parse_memory(args.events_max_bytes)),
    )
    bus = await Bus.connect(nats_url(args), name="bacq-requester", wait=SERVICE_CONNECT_WAIT)
    try:
        return await _serve(Requester(bus, config).serve)
    finally:
        await bus.close()


async def cmd_verifier(args: argparse.Namespace) -> int:
    from bacq.verify.service import Verifier

    bus = await Bus.connect(nats_url(args), name="bacq-verifier", wait=SERVICE_CONNECT_WAIT)
    try:
        return await _serve((await Verifier.create(bus)).serve)
    finally:
        await bus.close()


async def cmd_worker(args: argparse.Namespace) -> int:
    from bacq.worker.executor import DockerExecutor
    from bacq.worker.service import Worker, WorkerConfig

    try:
        config = WorkerConfig(
            node_id=args.node_id or socket.gethostname().split(".")[0],
            nats_url=nats_url(args),
            ipfs_api=ipfs_api(args),
            work_dir=Path(args.work_dir),
            labels=_key_values(args.label, "label (--label)"),
            cpu=args.cpu,
            memory=parse_memory(args.memory),
            max_jobs=args.max_jobs,
            fetch_timeout=args.fetch_timeout,
            heartbeat_interval=args.heartbeat_interval,
            drain_timeout=args.drain_timeout,
            tamper=args.tamper,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    executor = DockerExecutor.from_env()
    # adding a large results folder can take a while; fetches have their own --fetch-timeout
    storage = await Storage.connect(config.ipfs_api, timeout=args.ipfs_timeout)
    bus = await Bus.connect(
        config.nats_url, name=f"bacq-worker-{config.node_id}", wait=SERVICE_CONNECT_WAIT
    )
    try:
        return await _serve(Worker(config, bus, storage, executor).serve)
    finally:
        await bus.close()
        await storage.close()
        executor.close()


def cmd_devstack(args: argparse.Namespace) -> int:
    from bacq.devstack import Devstack

    stack = Devstack(
        workers=args.workers,
        bad_workers=args.bad_workers,
        kubo_nodes=args.kubo_nodes,
        state_dir=Path(args.state_dir) if args.state_dir else None,
    )
    err.print(
        f"starting devstack: nats-server, {args.kubo_nodes} kubo nodes, requester, verifier, "
        f"{args.workers} workers ({args.bad_workers} bad) …"
    )
    stopping = False

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # a background job of a script starts with SIGINT ignored: Ctrl-C must stop the stack anyway
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stack.start()
        if args.env_file:
            Path(args.env_file).write_text(stack.env_lines() + "\n")
        err.print(f"devstack is up; logs in {stack.logs}. Paste these lines in another terminal:")
        print(stack.env_lines(), flush=True)
        err.print("Ctrl-C stops everything.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stopping = True
        err.print("stopping devstack …")
    finally:
        stack.stop()
        if args.env_file:
            Path(args.env_file).unlink(missing_ok=True)
    return EXIT_OK if stopping else EXIT_FAILED


# -- parser --------------------------------------------------------------------------------------
def _connection_flags(parser: argparse.ArgumentParser, *, ipfs: bool = False) -> None:
    parser.add_argument(
        "--nats", metavar="URL", help=f"NATS server (default: $BACQ_NATS_URL or {DEFAULT_NATS_URL})"
    )
    if ipfs:
        parser.add_argument(
            "--ipfs",
            metavar="MULTIADDR",
            help=f"kubo RPC API (default: $BACQ_IPFS_API or {DEFAULT_IPFS_API})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bacq",
        description="Compute over content-addressed data: run Docker jobs on IPFS inputs, "
        "verified by a quorum of workers.",
        epilog="Exit codes: 0 ok/accepted, 1 failed/void/error, 2 bad usage or spec, "
        "3 accepted but the command exited non-zero, 130 interrupted.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run a job and wait for its verdict",
        description="Run IMAGE [CMD...] on workers. Put -- before CMD when it has options.",
    )
    run.add_argument(
        "-v",
        "--input",
        action="append",
        default=[],
        metavar="CID:PATH",
        help="mount an IPFS CID read-only at PATH (repeatable)",
    )
    run.add_argument(
        "-o",
        "--output-volume",
        action="append",
        default=[],
        metavar="NAME:PATH",
        help="collect the folder PATH as NAME in the results (repeatable)",
    )
    run.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("-w", "--workdir", metavar="PATH", help="working directory in the container")
    run.add_argument("--entrypoint", help="override the image's entrypoint")
    run.add_argument("--concurrency", type=int, default=1, help="workers that run the job (1)")
    run.add_argument(
        "--confidence", type=int, default=0, help="matching results needed to accept (0)"
    )
    run.add_argument("--min-bids", type=int, default=0, help="bids to wait for first (0)")
    run.add_argument("--verifier", choices=["noop", "deterministic"], default="deterministic")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds the job may run (600)")
    run.add_argument(
        "--bid-timeout", type=float, default=10.0, help="seconds to wait for enough bids (10)"
    )
    run.add_argument("--cpu", type=float, default=1.0, help="CPU cores per execution (1)")
    run.add_argument("--memory", default="512m", help="memory per execution (512m)")
    run.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label the job (repeatable)",
    )
    run.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only workers with this label may bid (repeatable)",
    )
    run.add_argument("--no-wait", action="store_true", help="print the job id and return")
    run.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="submitting again with the same key returns the same job",
    )
    run.add_argument("--id-only", action="store_true", help="print only the job id and return")
    run.add_argument("--output", choices=["table", "json"], default="table")
    _connection_flags(run)
    run.add_argument("image", help="Docker image, e.g. bacq-test/debian:bookworm")
    run.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments")
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="list jobs, newest first")
    lst.add_argument("-n", type=int, default=0, help="show at most N jobs")
    lst.add_argument("--output", choices=["table", "json"], default="table")
    _connection_flags(lst)
    lst.set_defaults(func=cmd_list)

    describe = sub.add_parser("describe", help="a job's spec, per-node states, CIDs and verdict")
    describe.add_argument("job_id", metavar="JOB_ID", help="job id (a unique prefix will do)")
    describe.add_argument("--output", choices=["table", "json"], default="table")
    _connection_flags(describe)
    describe.set_defaults(func=cmd_describe)

    get = sub.add_parser("get", help="download a job's accepted results")
    get.add_argument("job_id", metavar="JOB_ID")
    get.add_argument(
        "--output-dir",
        metavar="DIR",
        help="where to put them (default: ./JOB_ID); must not exist or be empty",
    )
    get.add_argument("--timeout", type=float, default=300.0, help="seconds for the download (300)")
    _connection_flags(get, ipfs=True)
    get.set_defaults(func=cmd_get)

    ipfs = sub.add_parser("ipfs", help="IPFS helpers")
    ipfs_sub = ipfs.add_subparsers(dest="ipfs_cmd", metavar="COMMAND", required=True)
    add = ipfs_sub.add_parser("add", help="add files or folders; prints one CID per path")
    add.add_argument("paths", nargs="+", metavar="PATH")
    _connection_flags(add, ipfs=True)
    add.set_defaults(func=cmd_ipfs_add)

    schema = sub.add_parser("schema", help="print the JSON Schema of a job spec")
    schema.set_defaults(func=cmd_validate)

    _audit.add_parsers(sub, _connection_flags)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _: print(f"bacq {__version__}") or EXIT_OK)

    devstack = sub.add_parser("devstack", help="run a whole bacq network locally until Ctrl-C")
    devstack.add_argument("--workers", type=int, default=3)
    devstack.add_argument(
        "--bad-workers", type=int, default=0, help="how many workers tamper with their results"
    )
    devstack.add_argument("--kubo-nodes", type=int, default=2)
    devstack.add_argument("--state-dir", help="keep state and logs here (default: a temp dir)")
    devstack.add_argument("--env-file", help="also write the export lines to this file")
    devstack.set_defaults(func=cmd_devstack)

    requester = sub.add_parser("requester", help="run the requester service")
    requester.add_argument(
        "--result-grace",
        type=float,
        default=120.0,
        help="seconds beyond a job's timeout to wait for results (120)",
    )
    requester.add_argument(
        "--lost-after",
        type=float,
        default=10.0,
        help="seconds without a worker heartbeat before its job moves (10)",
    )
    requester.add_argument(
        "--verify-timeout",
        type=float,
        default=60.0,
        help="seconds from the last answer to the verdict (60)",
    )
    requester.add_argument(
        "--events-max-age",
        type=float,
        default=365.0,
        metavar="DAYS",
        help="job histories older than this are dropped (365; 0 = never)",
    )
    requester.add_argument(
        "--events-max-bytes",
        default="10g",
        metavar="SIZE",
        help="the oldest histories go beyond this size (10g; 0 = no limit)",
    )
    _connection_flags(requester)
    requester.set_defaults(func=cmd_requester)

    verifier = sub.add_parser("verifier", help="run the verifier service")
    _connection_flags(verifier)
    verifier.set_defaults(func=cmd_verifier)

    worker = sub.add_parser("worker", help="run a worker service")
    worker.add_argument("--node-id", help="this worker's name (default: the host name)")
    worker.add_argument("--work-dir", default=os.path.expanduser("~/.local/state/bacq/worker"))
    worker.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    worker.add_argument(
        "--cpu", type=float, default=float(os.cpu_count() or 1), help="CPU cores to offer"
    )
    worker.add_argument("--memory", default="4g", help="memory to offer (4g)")
    worker.add_argument("--max-jobs", type=int, default=4, help="jobs at once (4)")
    worker.add_argument(
        "--fetch-timeout",
        type=float,
        default=120.0,
        help="seconds to fetch each input from IPFS (120)",
    )
    worker.add_argument(
        "--ipfs-timeout", type=float, default=600.0, help="seconds for other IPFS calls (600)"
    )
    worker.add_argument(
        "--heartbeat-interval", type=float, default=2.0, help="seconds between heartbeats (2)"
    )
    worker.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="on SIGTERM, seconds running jobs get to finish before they are handed back (60)",
    )
    worker.add_argument("--tamper", action="store_true", help=argparse.SUPPRESS)
    _connection_flags(worker, ipfs=True)
    worker.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    service = args.cmd in ("requester", "verifier", "worker")
    configure_logging(
        json=True if service or os.environ.get("BACQ_LOG_JSON") else None,
        level=None if service or args.debug else "WARNING",
    )
    try:
        client_func = getattr(args, "client_func", None)
        result = _with_client(client_func, args) if client_func else args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except SpecError as exc:
        err.print("[red]error:[/] invalid job spec")
        for field, message in exc.problems:
            err.print(f"  [bold]{field}[/]: {message}")
        return EXIT_USAGE
    except (UsageError, ConfigError) as exc:
        err.print(f"[red]error:[/] {exc}")
        return EXIT_USAGE
    except BacqError as exc:
        if args.debug:
            raise
        err.print(f"[red]error:[/] {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
