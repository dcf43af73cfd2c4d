"""``bacq requester``, ``verifier``, ``worker`` and ``devstack``: the long-running services.

Touches NATS, kubo, Docker (workers) and local processes (``devstack``); a service runs until
SIGTERM/SIGINT and tells systemd how it goes (``bacq.sdnotify``). Services log JSON lines.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from bacq.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    add_command,
    connection_flags,
    err,
    ipfs_api,
    key_values,
    nats_url,
)

if TYPE_CHECKING:
    import asyncio

__all__ = ["register", "serve"]

SERVICE_CONNECT_WAIT = 60.0  # seconds a service waits for NATS at start (it may be starting too)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    devstack = add_command(sub, common, "devstack")
    devstack.add_argument("--workers", type=int, default=3)
    devstack.add_argument(
        "--bad-workers", type=int, default=0, help="how many workers tamper with their results"
    )
    devstack.add_argument("--kubo-nodes", type=int, default=2)
    devstack.add_argument("--state-dir", help="keep state and logs here (default: a temp dir)")
    devstack.add_argument("--env-file", help="also write the export lines to this file")
    devstack.set_defaults(func=cmd_devstack)

    requester = add_command(sub, common, "requester")
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
        default=180.0,
        help="seconds from the last answer to the verdict (180; keep it well above the "
        "verifier's 60 s for a worker's reveal)",
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
    requester.add_argument(
        "--nodes-config",
        metavar="FILE",
        help="operators and capacity caps per worker node, YAML/JSON (env BACQ_NODES_CONFIG; "
        "default: each node its own operator, at most 16 cpu, 64 GiB, 16 jobs)",
    )
    requester.add_argument(
        "--signing-key",
        metavar="FILE",
        help="nkey seed that signs job events; made (0600) when missing (env BACQ_SIGNING_KEY; "
        "default ~/.local/state/bacq/requester/signing.nk)",
    )
    requester.add_argument(
        "--offences-limit",
        type=int,
        default=10,
        help="forged or malformed messages and bad reveals before a node is quarantined (10)",
    )
    requester.add_argument(
        "--rejected-limit",
        type=int,
        default=5,
        help="outvoted results (outnumbering its verified ones) before quarantine (5)",
    )
    _metrics_flag(requester)
    connection_flags(requester)
    requester.set_defaults(func=cmd_requester)

    verifier = add_command(sub, common, "verifier")
    _metrics_flag(verifier)
    connection_flags(verifier)
    verifier.set_defaults(func=cmd_verifier)

    worker = add_command(sub, common, "worker")
    worker.add_argument("--node-id", help="this worker's name (default: the host name)")
    worker.add_argument(
        "--work-dir",
        default=os.path.expanduser("~/.local/state/bacq/worker"),
        help="this worker's own folder (jobs' inputs and results, results kept for the "
        "verifier): one worker per folder, a second one is refused",
    )
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
    worker.add_argument(
        "--max-input-size",
        default="10g",
        metavar="SIZE",
        help="a job's inputs together, checked from their DAGs before any download (10g)",
    )
    worker.add_argument(
        "--max-input-entries",
        type=int,
        default=100_000,
        metavar="N",
        help="files, folders and links in a job's inputs together (100000)",
    )
    worker.add_argument(
        "--max-result-entries",
        type=int,
        default=100_000,
        metavar="N",
        help="files and folders a job may leave in its results (100000)",
    )
    worker.add_argument("--tamper", action="store_true", help=argparse.SUPPRESS)
    _metrics_flag(worker)
    connection_flags(worker, ipfs=True)
    worker.set_defaults(func=cmd_worker)


STOP_GRACE = 15.0  # seconds a service has to wind down after SIGTERM before it is cancelled


async def serve(
    run: Callable[[asyncio.Event], Coroutine[Any, Any, None]], *, stop_grace: float = STOP_GRACE
) -> int:
    """Run a service until SIGTERM/SIGINT, telling systemd (when it runs us) how it goes.

    A service that has not finished ``stop_grace`` seconds after the signal (one still starting
    up, asking a NATS server that is gone again and again) is cancelled."""
    import asyncio
    import contextlib
    import signal

    from bacq.sdnotify import Notifier, on_log_event

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
            err().print(f"stopped after {stop_grace:g}s of winding down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        keepalive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keepalive
        notifier.status(f"stopped: {status_line()}")
        notifier.close()
    return EXIT_OK


def _size(value: str, flag: str) -> int:
    from bacq.spec import parse_memory

    try:
        return parse_memory(value)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _metrics_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (env BACQ_METRICS_PORT; "
        "BACQ_METRICS_ADDR picks the address)",
    )


def _export_metrics_port(args: argparse.Namespace) -> None:
    if getattr(args, "metrics_port", None) is not None:
        os.environ["BACQ_METRICS_PORT"] = str(args.metrics_port)


async def cmd_requester(args: argparse.Namespace) -> int:
    from bacq.bus import Bus
    from bacq.requester.service import Requester, RequesterConfig
    from bacq.spec import parse_memory

    _export_metrics_port(args)
    config = RequesterConfig(
        result_grace=args.result_grace,
        lost_after=args.lost_after,
        verify_timeout=args.verify_timeout,
        events_max_age=args.events_max_age * 86400,
        events_max_bytes=int(parse_memory(args.events_max_bytes)),
        nodes_config=args.nodes_config,
        signing_key=args.signing_key,
        offences_limit=args.offences_limit,
        rejected_limit=args.rejected_limit,
    )
    bus = await Bus.connect(nats_url(args), name="bacq-requester", wait=SERVICE_CONNECT_WAIT)
    try:
        return await serve(Requester(bus, config).serve)
    finally:
        await bus.close()


async def cmd_verifier(args: argparse.Namespace) -> int:
    from bacq.bus import Bus
    from bacq.verify.service import Verifier

    _export_metrics_port(args)
    bus = await Bus.connect(nats_url(args), name="bacq-verifier", wait=SERVICE_CONNECT_WAIT)
    try:
        return await serve((await Verifier.create(bus)).serve)
    finally:
        await bus.close()


async def cmd_worker(args: argparse.Namespace) -> int:
    _export_metrics_port(args)
    import socket
    from pathlib import Path

    from bacq.bus import Bus
    from bacq.spec import parse_memory
    from bacq.storage import Storage
    from bacq.worker.executor import make_executor
    from bacq.worker.service import Worker, WorkerConfig
    from bacq.worker.wasm import WasmOptions

    try:
        config = WorkerConfig(
            node_id=args.node_id or socket.gethostname().split(".")[0],
            nats_url=nats_url(args),
            ipfs_api=ipfs_api(args),
            work_dir=Path(args.work_dir),
            labels=key_values(args.label, "label (--label)"),
            cpu=args.cpu,
            memory=parse_memory(args.memory),
            max_jobs=args.max_jobs,
            fetch_timeout=args.fetch_timeout,
            heartbeat_interval=args.heartbeat_interval,
            drain_timeout=args.drain_timeout,
            tamper=args.tamper,
            max_input_bytes=_size(args.max_input_size, "--max-input-size"),
            max_input_entries=args.max_input_entries,
            max_result_entries=args.max_result_entries,
            results_limit=_size(args.results_limit, "--results-limit"),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        results_limit = parse_memory(args.results_limit)
    except ValueError as exc:
        raise UsageError(f"--results-limit: {exc}") from None
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
        return await serve(
            Worker(config, bus, storage, executor).serve,
            stop_grace=config.drain_timeout + STOP_GRACE,
        )
    finally:
        await bus.close()
        await storage.close()
        executor.close()


def cmd_devstack(args: argparse.Namespace) -> int:
    import signal
    import time
    from pathlib import Path

    from bacq.devstack import Devstack

    stack = Devstack(
        workers=args.workers,
        bad_workers=args.bad_workers,
        kubo_nodes=args.kubo_nodes,
        state_dir=Path(args.state_dir) if args.state_dir else None,
    )
    err().print(
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
        err().print(f"devstack is up; logs in {stack.logs}. Paste these lines in another terminal:")
        print(stack.env_lines(), flush=True)
        err().print("Ctrl-C stops everything.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stopping = True
        err().print("stopping devstack …")
    finally:
        stack.stop()
        if args.env_file:
            Path(args.env_file).unlink(missing_ok=True)
    return EXIT_OK if stopping else EXIT_FAILED
