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
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import shtab
from rich.console import Console
from rich.live import Live

from bacq import __version__, _audit
from bacq.bus import DEFAULT_NATS_URL, Bus
from bacq.client import Client
from bacq.errors import BacqError, ConfigError, SpecError, StorageError
from bacq.jobfile import JobFileError, load_job_file, spec_to_yaml
from bacq.log import configure as configure_logging
from bacq.logs import read_logs
from bacq.models import JobRecord
from bacq.nodes import node_rows, read_nodes
from bacq.render import (
    FORMATS,
    LiveView,
    dump,
    plain_progress,
    render_describe,
    render_list,
    render_nodes,
    render_verdict,
)
from bacq.sdnotify import Notifier, on_log_event
from bacq.spec import JobSpec, json_schema, parse_memory, parse_spec
from bacq.states import ExecState, JobState
from bacq.storage import DEFAULT_IPFS_API, Storage
from bacq.storage import preload as preload_storage

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
        "queue_timeout": args.queue_timeout,
        "retries": args.retries,
        "network": args.network,
        "resources": {"cpu": args.cpu, "memory": args.memory},
    }
    if args.entrypoint is not None:
        spec["entrypoint"] = [args.entrypoint]
    if args.workdir is not None:
        spec["working_dir"] = args.workdir
    return spec


# -- running a job: shared by run and create ---------------------------------------------------
TAIL_LINES = 10  # lines of stdout/stderr shown under the verdict


def _job_json(job: JobRecord) -> dict[str, Any]:
    return job.model_dump(mode="json")


def _emit(data: Any, fmt: str) -> None:
    """Print ``data`` as JSON or YAML on stdout (plain print: never wrapped or styled)."""
    print(dump(data, fmt), end="" if fmt == "yaml" else "\n")


def _job_exit_code(job: JobRecord) -> int:
    if job.state != JobState.ACCEPTED:
        return EXIT_FAILED
    return EXIT_COMMAND_FAILED if job.exit_code else EXIT_OK


async def _output_tails(
    args: argparse.Namespace, job: JobRecord
) -> tuple[bytes | None, bytes | None, str]:
    """The ends of the accepted result's stdout and stderr, read from kubo (best effort)."""
    if job.result_cid is None:
        return None, None, ""
    try:
        storage = await Storage.connect(ipfs_api(args), timeout=15.0)
    except BacqError:
        return (
            None,
            None,
            f"(output not shown: no kubo at {ipfs_api(args)}; try `bacq logs {job.id}`)",
        )
    try:
        tails: list[bytes | None] = []
        for name in ("stdout", "stderr"):
            try:
                tails.append(await storage.read_tail(f"{job.result_cid}/{name}"))
            except BacqError:
                tails.append(None)
        return tails[0], tails[1], ""
    finally:
        await storage.close()


async def _submit_and_follow(args: argparse.Namespace, spec: JobSpec, *, wait: bool) -> int:
    async with await Client.connect(nats_url(args)) as client:
        job_id = await client.submit(spec, idempotency_key=args.idempotency_key)
        if args.id_only or not wait:
            print(job_id, flush=True)
            return EXIT_OK
        # the output is read from kubo at the end: import its client while the job runs
        preloading = asyncio.create_task(preload_storage())
        started = time.monotonic()
        machine = args.output in ("json", "yaml")
        live = None
        if not machine and sys.stdout.isatty():
            view = LiveView(job_id)
            live = Live(view, console=out, refresh_per_second=4, transient=False)
            on_change: Callable[[JobRecord], None] = view.update
        else:
            seen: dict[str, str] = {}
            if not machine:
                err.print(
                    f"job [bold]{job_id}[/] submitted; waiting (Ctrl-C detaches, the job goes on)"
                )

            def on_change(job: JobRecord) -> None:
                if not machine:
                    for line in plain_progress(job, seen):
                        err.print(line)

        try:
            if live is not None:
                with live:
                    job = await client.wait(job_id, on_change=on_change)
            else:
                job = await client.wait(job_id, on_change=on_change)
        except (KeyboardInterrupt, asyncio.CancelledError):
            err.print(
                f"detached: job {job_id} goes on. Follow it with `bacq logs -f {job_id}`, "
                f"see it with `bacq describe {job_id}`"
            )
            return EXIT_INTERRUPTED
        if machine:
            _emit(_job_json(job), args.output)
            return _job_exit_code(job)
        await preloading
        stdout, stderr, note = await _output_tails(args, job)
    render_verdict(
        out,
        job,
        elapsed=time.monotonic() - started,
        stdout=stdout,
        stderr=stderr,
        output_note=note,
        tail_lines=TAIL_LINES,
    )
    return _job_exit_code(job)


# -- commands ----------------------------------------------------------------------------------
async def cmd_run(args: argparse.Namespace) -> int:
    spec = parse_spec(_spec_from_run_args(args))
    if args.dry_run:
        print(spec_to_yaml(spec), end="")
        return EXIT_OK
    return await _submit_and_follow(args, spec, wait=not args.no_wait)


async def cmd_create(args: argparse.Namespace) -> int:
    spec = load_job_file(args.file)
    if args.dry_run:
        print(spec_to_yaml(spec), end="")
        return EXIT_OK
    return await _submit_and_follow(args, spec, wait=args.wait)


def cmd_validate(args: argparse.Namespace) -> int:
    spec = load_job_file(args.file)
    source = "<stdin>" if args.file == "-" else args.file
    if args.output in ("json", "yaml"):
        _emit({"valid": True, "file": source, "spec": spec.model_dump(mode="json")}, args.output)
    else:
        out.print(
            f"[green]valid[/]: {source} runs {spec.image} on {spec.concurrency} worker(s), "
            f"verifier {spec.verifier}"
        )
    return EXIT_OK


def _job_matches(job: JobRecord, args: argparse.Namespace, since: dt.datetime | None) -> bool:
    if args.states and job.state not in args.states:
        return False
    for key, value in args.labels.items():
        if job.spec.labels.get(key) != value:
            return False
    return since is None or job.created_at >= since


_SORT_KEYS: dict[str, Callable[[JobRecord], Any]] = {
    "created": lambda j: j.created_at,
    "updated": lambda j: j.updated_at,
    "state": lambda j: (j.state.value, j.created_at),
    "image": lambda j: (j.spec.image, j.created_at),
    "id": lambda j: j.id,
}


async def cmd_list(args: argparse.Namespace) -> int:
    args.states = _states(args.state)
    args.labels = _key_values(args.label, "label (--label)")
    since = parse_since(args.since) if args.since else None
    async with await Client.connect(nats_url(args)) as client:
        jobs = await client.jobs()
    jobs = [j for j in jobs if _job_matches(j, args, since)]
    newest_first = args.sort in ("created", "updated")
    jobs.sort(key=_SORT_KEYS[args.sort], reverse=newest_first != args.reverse)
    jobs = jobs[: args.n] if args.n else jobs
    if args.quiet:
        for job in jobs:
            print(job.id)
    elif args.output in ("json", "yaml"):
        _emit([_job_json(j) for j in jobs], args.output)
    elif not jobs:
        err.print(
            "no jobs match these filters"
            if args.states or args.labels or since
            else "no jobs yet; submit one with `bacq run`"
        )
    else:
        render_list(out, jobs, wide=args.wide)
    return EXIT_OK


def _states(values: list[str]) -> set[JobState]:
    states = set()
    for value in ",".join(values).split(","):
        if not value.strip():
            continue
        try:
            states.add(JobState(value.strip().lower()))
        except ValueError:
            raise UsageError(
                f"--state {value!r} is not a job state; use one of "
                + ", ".join(s.value for s in JobState)
            ) from None
    return states


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")


def parse_since(text: str, at: dt.datetime | None = None) -> dt.datetime:
    """``--since``: a duration back from now (30s, 10m, 2h, 1d, 1w) or an ISO date/time."""
    match = _DURATION.match(text.strip().lower())
    at = at or dt.datetime.now(dt.UTC)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return at - dt.timedelta(seconds=float(match.group(1)) * unit)
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--since {text!r} is neither a duration (30s, 10m, 2h, 1d, 1w) nor a date "
            "(2026-01-31 or 2026-01-31T12:00)"
        ) from None
    return moment if moment.tzinfo else moment.astimezone()


async def cmd_describe(args: argparse.Namespace) -> int:
    async with await Client.connect(nats_url(args)) as client:
        job = await client.job(args.job_id)
    if args.output in ("json", "yaml"):
        _emit(_job_json(job), args.output)
    else:
        render_describe(out, job)
    return EXIT_OK


async def cmd_nodes(args: argparse.Namespace) -> int:
    async with await Client.connect(nats_url(args)) as client:
        nodes, jobs = await asyncio.gather(read_nodes(client.bus), client.jobs())
    rows = node_rows(nodes, jobs)
    if args.output in ("json", "yaml"):
        _emit(rows, args.output)
    elif not rows:
        err.print("no workers seen yet; start one with `bacq worker` (or `bacq devstack`)")
    else:
        render_nodes(out, rows, wide=args.wide)
    return EXIT_OK


class _LineWriter:
    """Writes chunks of output as whole lines, prefixed by the node when several nodes speak."""

    def __init__(self, prefix: bool, *, as_json: bool = False) -> None:
        self.prefix = prefix
        self.as_json = as_json  # one JSON object per piece, all on stdout
        self.partial: dict[tuple[str, str], str] = {}

    def write(self, node: str, stream: str, text: str, *, end: bool = False) -> None:
        if self.as_json:
            if text:
                piece = {"node_id": node, "stream": stream, "text": text}
                print(json.dumps(piece), flush=True)
            return
        target = sys.stdout if stream == "stdout" else sys.stderr
        if not self.prefix:
            target.write(text)
            target.flush()
            return
        key = (node, stream)
        buffered = self.partial.pop(key, "") + text
        lines = buffered.split("\n")
        rest = lines.pop()
        if end and rest:
            lines.append(rest)
            rest = ""
        if rest:
            self.partial[key] = rest
        for line in lines:
            target.write(f"{node} | {line}\n")
        target.flush()


async def cmd_logs(args: argparse.Namespace) -> int:
    async with await Client.connect(nats_url(args)) as client:
        job = await client.job(args.job_id)
        chosen = sorted(
            e.node_id
            for e in job.executions.values()
            if e.state not in (ExecState.BID, ExecState.BID_REJECTED)
        )
        if args.node and args.node not in job.executions:
            raise UsageError(
                f"node {args.node!r} has no execution of {job.id}; its nodes: "
                + (", ".join(chosen) or "none yet")
            )
        if job.final and (job.result_cid or any(e.result_cid for e in job.executions.values())):
            return await _logs_from_results(args, job)
        writer = _LineWriter(
            prefix=args.node is None and job.spec.concurrency > 1, as_json=args.output == "json"
        )
        ended = asyncio.Event()
        watcher = None
        if args.follow and not job.final:

            async def watch() -> None:
                try:
                    await client.wait(job.id)
                finally:
                    ended.set()

            watcher = asyncio.create_task(watch())
        try:
            async for chunk in read_logs(
                client.bus, job.id, follow=ended if args.follow and not job.final else None
            ):
                if args.node and chunk.node_id != args.node:
                    continue
                if chunk.skipped:
                    err.print(
                        f"[dim][{chunk.node_id} {chunk.stream}: {chunk.skipped} bytes skipped][/]"
                    )
                writer.write(chunk.node_id, chunk.stream, chunk.text, end=chunk.eof)
        except (KeyboardInterrupt, asyncio.CancelledError):
            return EXIT_INTERRUPTED
        finally:
            if watcher is not None:
                watcher.cancel()
        if not job.final and not args.follow:
            err.print(f"[dim](job {job.id} is still {job.state}; -f follows it)[/]")
        elif job.final and not args.follow:
            err.print(
                f"[dim](job {job.id} is {job.state} and left no results; live output shown)[/]"
            )
    return EXIT_OK


async def _logs_from_results(args: argparse.Namespace, job: JobRecord) -> int:
    if args.node:
        execution = job.executions[args.node]
        cids: list[tuple[str, str | None]] = [(args.node, execution.result_cid)]
    elif job.result_cid:
        cids = [("", job.result_cid)]
    else:
        cids = [
            (e.node_id, e.result_cid)
            for e in sorted(job.executions.values(), key=lambda e: e.node_id)
            if e.result_cid
        ]
    found = [(node, cid) for node, cid in cids if cid]
    if not found:
        raise StorageError(f"node {args.node} left no results for {job.id}")
    storage = await Storage.connect(ipfs_api(args), timeout=args.timeout)
    try:
        writer = _LineWriter(prefix=len(found) > 1, as_json=args.output == "json")
        for node, cid in found:
            node = node or next(  # the accepted result: name a node that produced it
                (e.node_id for e in job.executions.values() if e.result_cid == cid), ""
            )
            for stream in ("stdout", "stderr"):
                data = await storage.read_tail(f"{cid}/{stream}", limit=args.limit)
                writer.write(node, stream, data.decode("utf-8", errors="replace"), end=True)
    finally:
        await storage.close()
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


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


async def _with_client(func: Any, args: argparse.Namespace) -> int:
    async with await Client.connect(nats_url(args)) as client:
        return int(await func(args, client, out))


def _versions() -> dict[str, str]:
    found = {"bacq": __version__, "python": platform.python_version()}
    for package in ("nats-py", "aioipfs", "docker", "pydantic", "rich"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def cmd_version(args: argparse.Namespace) -> int:
    versions = _versions()
    if args.output in ("json", "yaml"):
        _emit(versions, args.output)
    else:
        out.print(f"bacq {versions.pop('bacq')}")
        out.print(", ".join(f"{k} {v}" for k, v in versions.items()), style="dim")
    return EXIT_OK


async def cmd_doctor(args: argparse.Namespace) -> int:
    from bacq.doctor import run_checks

    checks = await run_checks(nats_url(args), ipfs_api(args))
    failed = [c for c in checks if not c.ok and c.required]
    if args.output in ("json", "yaml"):
        _emit(
            {"ok": not failed, "version": __version__, "checks": [c.as_dict() for c in checks]},
            args.output,
        )
    else:
        for check in checks:
            mark = (
                "[green]✓[/]" if check.ok else ("[red]✗[/]" if check.required else "[yellow]![/]")
            )
            out.print(f"{mark} [bold]{check.name:<9}[/] {check.detail}")
            if not check.ok and check.fix:
                out.print(f"  [dim]fix:[/] {check.fix}")
        out.print("[green]all good[/]" if not failed else f"[red]{len(failed)} problem(s)[/]")
    return EXIT_FAILED if failed else EXIT_OK


# job ids complete from `bacq list -q` (given 3 s: a Tab must not hang when NATS is away)
JOB_ID_COMPLETION = {"bash": "_bacq_compgen_job_ids", "zsh": "_bacq_job_ids"}
COMPLETION_PREAMBLE = {
    "bash": """
# $1=the word being completed
_bacq_compgen_job_ids() {
  compgen -W "$(timeout 3 bacq list -q 2>/dev/null)" -- "$1"
}
""",
    "zsh": """
_bacq_job_ids() {
  local -a ids
  ids=(${(f)"$(timeout 3 bacq list -q 2>/dev/null)"})
  compadd -a ids
}
""",
}


def cmd_completion(args: argparse.Namespace) -> int:
    script = shtab.complete(
        build_parser(), shell=args.shell, preamble=COMPLETION_PREAMBLE[args.shell]
    )
    print(script)
    return EXIT_OK


# -- services ------------------------------------------------------------------------------------
STOP_GRACE = 15.0  # seconds a service has to wind down after SIGTERM before it is cancelled


async def _serve(
    run: Callable[[asyncio.Event], Coroutine[Any, Any, None]], *, stop_grace: float = STOP_GRACE
) -> int:
    """Run a service until SIGTERM/SIGINT, telling systemd (when it runs us) how it goes.

    A service that has not finished ``stop_grace`` seconds after the signal (one still starting
    up, asking a NATS server that is gone again and again) is cancelled."""
    service = getattr(run, "__self__", None)
    status_line: Callable[[], str] = getattr(service, "status_line", None) or (lambda: "serving")
    notifier = Notifier()
    on_log_event("service.ready", lambda: notifier.ready(status_line()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    serving = asyncio.create_task(run(stop), name="service")

    def on_signal() -> None:
        if not stop.is_set():
            notifier.stopping(f"stopping: {status_line()}")
            loop.call_later(stop_grace, serving.cancel)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    keepalive = asyncio.create_task(notifier.keepalive(status_line), name="sd-keepalive")
    try:
        try:
            await serving
        except asyncio.CancelledError:
            if not stop.is_set() or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            err.print(f"stopped after {stop_grace:g}s of winding down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        keepalive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keepalive
        notifier.status(f"stopped: {status_line()}")
        notifier.close()
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
    from bacq.worker.executor import make_executor
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
    try:
        results_limit = parse_memory(args.results_limit)
    except ValueError as exc:
        raise UsageError(f"--results-limit: {exc}") from None
    from bacq.worker.wasm import WasmOptions

    try:
        wasm = WasmOptions(
            cache_dir=Path(args.wasm_cache) if args.wasm_cache else None,
            module_limit=parse_memory(args.wasm_module_limit),
            fuel=args.wasm_fuel,
        )
    except ValueError as exc:
        raise UsageError(f"--wasm-module-limit: {exc}") from None
    executor = make_executor(
        args.executor,
        allow_network=args.allow_network,
        results_limit=results_limit,
        container_user=args.container_user,
        tmpfs_size=args.tmp_size,
        wasm=wasm,
    )
    # adding a large results folder can take a while; fetches have their own --fetch-timeout
    storage = await Storage.connect(config.ipfs_api, timeout=args.ipfs_timeout)
    bus = await Bus.connect(
        config.nats_url, name=f"bacq-worker-{config.node_id}", wait=SERVICE_CONNECT_WAIT
    )
    try:
        # a draining worker gives its jobs --drain-timeout to finish, then hands them back
        return await _serve(
            Worker(config, bus, storage, executor).serve,
            stop_grace=config.drain_timeout + STOP_GRACE,
        )
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
EPILOG = (
    "Exit codes: 0 ok/accepted, 1 failed/void/cancelled/error, 2 bad usage or spec, "
    "3 accepted but the command exited non-zero, 130 interrupted (the job goes on)."
)

# NATS credential and TLS flags: each sets the BACQ_NATS_* variable bacq.auth reads (secrets are
# given as files or environment variables, never as arguments, which any local user can list)
_NATS_AUTH_FLAGS = {
    "nats_user": (
        "--nats-user",
        "NAME",
        "BACQ_NATS_USER",
        "NATS user (password: $BACQ_NATS_PASSWORD or --nats-password-file)",
    ),
    "nats_password_file": (
        "--nats-password-file",
        "FILE",
        "BACQ_NATS_PASSWORD_FILE",
        "file holding the NATS user's password",
    ),
    "nats_token_file": (
        "--nats-token-file",
        "FILE",
        "BACQ_NATS_TOKEN_FILE",
        "file holding a NATS token (or $BACQ_NATS_TOKEN)",
    ),
    "nats_creds": ("--nats-creds", "FILE", "BACQ_NATS_CREDS", "NATS .creds file (JWT + nkey)"),
    "nats_nkey": ("--nats-nkey", "FILE", "BACQ_NATS_NKEY", "file holding an nkey seed (SU...)"),
    "tls_ca": ("--tls-ca", "FILE", "BACQ_NATS_TLS_CA", "CA bundle to verify NATS servers (TLS)"),
    "tls_cert": ("--tls-cert", "FILE", "BACQ_NATS_TLS_CERT", "client certificate (mutual TLS)"),
    "tls_key": ("--tls-key", "FILE", "BACQ_NATS_TLS_KEY", "client certificate's key"),
}


def _export_nats_flags(args: argparse.Namespace) -> None:
    for dest, (_, _, env, _) in _NATS_AUTH_FLAGS.items():
        value = getattr(args, dest, None)
        if value:
            os.environ[env] = str(value)


def _connection_flags(parser: argparse.ArgumentParser, *, ipfs: bool = False) -> None:
    parser.add_argument(
        "--nats",
        metavar="URL",
        help=f"NATS server(s), comma-separated (default: $BACQ_NATS_URL or {DEFAULT_NATS_URL})",
    )
    for dest, (flag, metavar, env, text) in _NATS_AUTH_FLAGS.items():
        parser.add_argument(flag, dest=dest, metavar=metavar, help=f"{text} [${env}]")
    if ipfs:
        parser.add_argument(
            "--ipfs",
            metavar="MULTIADDR",
            help=f"kubo RPC API (default: $BACQ_IPFS_API or {DEFAULT_IPFS_API})",
        )


def _output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        choices=FORMATS,
        default="table",
        help="table for people (default); json or yaml for programs",
    )


def _follow_flags(parser: argparse.ArgumentParser) -> None:
    """What run and create share once the job is submitted."""
    parser.add_argument("--id-only", action="store_true", help="print only the job id and return")
    parser.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="submitting again with the same key returns the same job",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the job as YAML (a job file) and stop"
    )
    _output_flag(parser)
    _connection_flags(parser, ipfs=True)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in bacq's one-line style (still exit 2)."""

    def error(self, message: str) -> NoReturn:
        err.print(f"[red]error:[/] {message}; see `{self.prog} --help`")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
    )
    parser: argparse.ArgumentParser = _Parser(
        prog="bacq",
        description="Compute over content-addressed data: run Docker jobs on IPFS inputs, "
        "verified by a quorum of workers.",
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True, parser_class=_Parser)

    def command(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common], epilog=EPILOG, **kwargs)

    run = command(
        "run",
        "run a job and follow it to its verdict",
        description="Run IMAGE [CMD...] on workers and show its progress live until the verdict "
        "(Ctrl-C detaches; the job goes on). Put -- before CMD when it has options.",
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
    run.add_argument(
        "--queue-timeout",
        type=float,
        default=3600.0,
        help="seconds the job may wait in the queue while the workers that could run it are "
        "busy (3600)",
    )
    run.add_argument(
        "--retries", type=int, default=2, help="times a lost execution moves to another worker (2)"
    )
    run.add_argument(
        "--network",
        action="store_true",
        help="the job needs network access (only workers run with --allow-network bid)",
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
    run.add_argument(
        "--wait",
        action="store_true",
        help="follow the job to its verdict (the default; --no-wait turns it off)",
    )
    run.add_argument("--no-wait", action="store_true", help="print the job id and return")
    _follow_flags(run)
    run.add_argument("image", help="Docker image, e.g. bacq-test/debian:bookworm")
    run.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments")
    run.set_defaults(func=cmd_run)

    create = command(
        "create",
        "submit the job of a YAML or JSON job file",
        description="Submit the job in FILE (YAML or JSON; - reads stdin) and print its id; "
        "--wait follows it like `bacq run`. `bacq run --dry-run ...` writes such a file.",
    )
    create.add_argument(
        "-f", "--file", required=True, metavar="FILE", help="job file, or - for stdin"
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    create.add_argument("--wait", action="store_true", help="follow the job to its verdict")
    _follow_flags(create)
    create.set_defaults(func=cmd_create)

    validate = command(
        "validate",
        "check a job file without submitting it",
        description="Check FILE (YAML or JSON; - reads stdin); each problem names the field and "
        "its line. Exit 0 when valid, 2 when not.",
    )
    validate.add_argument(
        "-f", "--file", required=True, metavar="FILE", help="job file, or - for stdin"
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    _output_flag(validate)
    validate.set_defaults(func=cmd_validate)

    lst = command("list", "list jobs, newest first", aliases=["ls"])
    lst.add_argument("-n", type=int, default=0, metavar="N", help="show at most N jobs")
    lst.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="STATE",
        help="only jobs in this state (repeatable or comma-separated: "
        + ",".join(s.value for s in JobState)
        + ")",
    )
    lst.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="only jobs with label"
    )
    lst.add_argument(
        "--since", metavar="WHEN", help="only jobs created since: 30s, 10m, 2h, 1d, 1w or a date"
    )
    lst.add_argument(
        "--sort", choices=sorted(_SORT_KEYS), default="created", help="sort key (created)"
    )
    lst.add_argument("--reverse", action="store_true", help="reverse the order")
    lst.add_argument("--wide", action="store_true", help="more columns")
    lst.add_argument("-q", "--quiet", action="store_true", help="print only the job ids")
    _output_flag(lst)
    _connection_flags(lst)
    lst.set_defaults(func=cmd_list)

    describe = command("describe", "a job's spec, per-node states, CIDs and verdict")
    describe.add_argument(
        "job_id", metavar="JOB_ID", help="job id (a unique prefix will do)"
    ).complete = JOB_ID_COMPLETION  # type: ignore[attr-defined]
    _output_flag(describe)
    _connection_flags(describe)
    describe.set_defaults(func=cmd_describe)

    logs = command(
        "logs",
        "a job's stdout and stderr (live while it runs)",
        description="Print the job's stdout (to stdout) and stderr (to stderr). While it runs, "
        "the output streamed by its workers; once it has results, the output in them (IPFS). "
        "Several workers: each line is prefixed with the node.",
    )
    logs.add_argument(
        "job_id", metavar="JOB_ID", help="job id (a unique prefix will do)"
    ).complete = JOB_ID_COMPLETION  # type: ignore[attr-defined]
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    logs.add_argument("--node", metavar="NODE", help="only this worker's output")
    logs.add_argument(
        "--limit",
        type=int,
        default=16 * 1024 * 1024,
        metavar="BYTES",
        help="from results: the last BYTES of each stream (16 MiB)",
    )
    logs.add_argument("--timeout", type=float, default=60.0, help="seconds for IPFS reads (60)")
    logs.add_argument(
        "--output",
        choices=["text", "json"],
        default="text",
        help="text: the output as printed (default); json: one object per piece on stdout, "
        "with node_id, stream and text",
    )
    _connection_flags(logs, ipfs=True)
    logs.set_defaults(func=cmd_logs)

    nodes = command("nodes", "workers seen: labels, capacity, jobs, heartbeat, verification")
    nodes.add_argument("--wide", action="store_true", help="more columns")
    _output_flag(nodes)
    _connection_flags(nodes)
    nodes.set_defaults(func=cmd_nodes)

    get = command("get", "download a job's accepted results")
    get.add_argument(
        "job_id", metavar="JOB_ID", help="job id (a unique prefix will do)"
    ).complete = JOB_ID_COMPLETION  # type: ignore[attr-defined]
    get.add_argument(
        "--output-dir",
        metavar="DIR",
        help="where to put them (default: ./JOB_ID); must not exist or be empty",
    ).complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    get.add_argument("--timeout", type=float, default=300.0, help="seconds for the download (300)")
    _connection_flags(get, ipfs=True)
    get.set_defaults(func=cmd_get)

    ipfs = command("ipfs", "IPFS helpers")
    ipfs_sub = ipfs.add_subparsers(
        dest="ipfs_cmd", metavar="COMMAND", required=True, parser_class=_Parser
    )
    add = ipfs_sub.add_parser(
        "add", help="add files or folders; prints one CID per path", parents=[common]
    )
    add.add_argument("paths", nargs="+", metavar="PATH").complete = shtab.FILE  # type: ignore[attr-defined]
    _connection_flags(add, ipfs=True)
    add.set_defaults(func=cmd_ipfs_add)

    schema = command("schema", "print the JSON Schema of a job spec (and of job files)")
    schema.set_defaults(func=cmd_schema)

    _audit.add_parsers(sub, _connection_flags)

    version = command("version", "print the versions of bacq and its libraries")
    _output_flag(version)
    version.set_defaults(func=cmd_version)

    doctor = command(
        "doctor",
        "check NATS, kubo and Docker: reachable? which versions? how to fix",
        description="Check that NATS (with JetStream and a requester), kubo and Docker answer; "
        "print their versions and, for each problem, how to fix it. Exit 1 when a required "
        "check fails (Docker and workers are only warnings: clients do not need them).",
    )
    _output_flag(doctor)
    _connection_flags(doctor, ipfs=True)
    doctor.set_defaults(func=cmd_doctor)

    completion = command(
        "completion",
        "print a shell completion script (bash or zsh)",
        description="Print the completion script for SHELL. bash: "
        "`bacq completion bash > ~/.local/share/bash-completion/completions/bacq`; zsh: "
        '`bacq completion zsh > "${fpath[1]}/_bacq"` (then start a new shell).',
    )
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(func=cmd_completion)

    devstack = command("devstack", "run a whole bacq network locally until Ctrl-C")
    devstack.add_argument("--workers", type=int, default=3)
    devstack.add_argument(
        "--bad-workers", type=int, default=0, help="how many workers tamper with their results"
    )
    devstack.add_argument("--kubo-nodes", type=int, default=2)
    devstack.add_argument("--state-dir", help="keep state and logs here (default: a temp dir)")
    devstack.add_argument("--env-file", help="also write the export lines to this file")
    devstack.set_defaults(func=cmd_devstack)

    requester = command("requester", "run the requester service")
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

    verifier = command("verifier", "run the verifier service")
    _connection_flags(verifier)
    verifier.set_defaults(func=cmd_verifier)

    worker = command("worker", "run a worker service")
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
    worker.add_argument(
        "--allow-network",
        action="store_true",
        help="run jobs that ask for network access with a network (default: no job gets one)",
    )
    worker.add_argument(
        "--results-limit",
        default="1g",
        metavar="SIZE",
        help="most output (folders + stdout + stderr) a job may leave (1g)",
    )
    worker.add_argument(
        "--container-user",
        metavar="UID:GID|image",
        help="user the job's container runs as (default: this worker's uid:gid, or 65534:65534 "
        "when the worker runs as root); 'image' keeps the image's own USER",
    )
    worker.add_argument(
        "--tmp-size", default="64m", metavar="SIZE", help="the container's writable /tmp (64m)"
    )
    worker.add_argument(
        "--executor",
        choices=("docker", "wasm", "noop"),
        default="docker",
        help="docker runs Docker and wasm jobs (default); wasm runs wasm jobs only (no Docker "
        "needed); noop runs nothing and answers every job with one fixed result folder: for "
        "benchmarks and tests of the message path only",
    )
    worker.add_argument(
        "--wasm-module-limit",
        default="64m",
        metavar="SIZE",
        help="largest .wasm module a wasm job may name (64m)",
    )
    worker.add_argument(
        "--wasm-fuel",
        type=int,
        default=10**13,
        metavar="N",
        help="fuel budget of a wasm job that sets none (about one unit per instruction)",
    )
    worker.add_argument(
        "--wasm-cache",
        default=None,
        metavar="DIR",
        help="where compiled wasm modules are kept (~/.cache/bacq/wasm-compiled)",
    )
    worker.add_argument("--tamper", action="store_true", help=argparse.SUPPRESS)
    _connection_flags(worker, ipfs=True)
    worker.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False) or os.environ.get("BACQ_DEBUG"))
    _export_nats_flags(args)
    service = args.cmd in ("requester", "verifier", "worker")
    configure_logging(
        json=True if service or os.environ.get("BACQ_LOG_JSON") else None,
        level=None if service or debug else "WARNING",
    )
    try:
        client_func = getattr(args, "client_func", None)
        result = _with_client(client_func, args) if client_func else args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        return _report(exc)


def _report(exc: Exception) -> int:
    """One line per problem, no traceback (``--debug`` shows it); returns the exit code."""
    if isinstance(exc, JobFileError):
        if all(p.field == "file" for p in exc.problems):  # unreadable, not YAML, not a mapping
            for problem in exc.problems:
                where = f"{exc.source}:{problem.line}" if problem.line else exc.source
                err.print(f"[red]error:[/] {where}: {problem.message}")
            return EXIT_USAGE
        err.print(f"[red]error:[/] {exc.source} is not a valid job file")
        for problem in sorted(exc.problems, key=lambda p: p.line or 0):
            where = f"{exc.source}:{problem.line}" if problem.line else exc.source
            err.print(f"  {where}: [bold]{problem.field}[/]: {problem.message}")
        return EXIT_USAGE
    if isinstance(exc, SpecError):
        err.print("[red]error:[/] invalid job spec")
        for field, message in exc.problems:
            err.print(f"  [bold]{field}[/]: {message}")
        return EXIT_USAGE
    if isinstance(exc, (UsageError, ConfigError)):
        err.print(f"[red]error:[/] {exc}")
        return EXIT_USAGE
    if isinstance(exc, BacqError):
        err.print(f"[red]error:[/] {exc}")
        return EXIT_FAILED
    err.print(
        f"[red]error:[/] unexpected {type(exc).__name__}: {exc}; rerun with --debug for the "
        "traceback and report it"
    )
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
