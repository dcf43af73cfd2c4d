"""``bacq run``, ``bacq create`` and ``bacq validate``: build or read job specs, submit them, follow
them to their verdict.

Touches NATS (submission, the jobs bucket), kubo (the ends of the result's stdout and stderr after
the verdict), the job file or stdin, and the terminal. ``run --no-wait`` imports only what
submission needs: no rich, no kubo client.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from bacq.commands.common import (
    EXIT_COMMAND_FAILED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    FILE_COMPLETION,
    UsageError,
    add_command,
    connection_flags,
    emit,
    err,
    ipfs_api,
    job_exit_code,
    key_values,
    lean_nats,
    nats_url,
    out,
    output_flag,
    pair,
)

if TYPE_CHECKING:
    from bacq.corenats import Connection
    from bacq.jobfile import FileProblem, JobsFile
    from bacq.models import JobRecord
    from bacq.spec import JobSpec

__all__ = ["register"]

TAIL_LINES = 10  # lines of stdout/stderr shown under the verdict


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    run = add_command(
        sub,
        common,
        "run",
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
    run.add_argument(
        "--deterministic",
        action="store_true",
        help="the output depends on the spec and inputs alone: an equal accepted job answers "
        "at once (known answer)",
    )
    run.add_argument(
        "--no-cache", action="store_true", help="run it even if an equal job was accepted"
    )
    run.add_argument(
        "--live-logs",
        action="store_true",
        help="stream the output live even with several verifying workers (weakens the check: "
        "another worker's operator could copy it instead of computing)",
    )
    run.add_argument(
        "--timeout", type=float, default=600.0, help="seconds the job's command may run (600)"
    )
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
        action=argparse.BooleanOptionalAction,
        default=True,
        help="follow the job to its verdict (the default); --no-wait prints the job id and returns",
    )
    _follow_flags(run)
    run.add_argument(
        "--engine",
        choices=["docker", "wasm"],
        help="docker (the default): IMAGE is a Docker image; wasm: IMAGE is a .wasm module (a "
        "CID, or a local file added to IPFS first). `bacq run python script.py` runs a Python "
        "script on the workers' CPython for WASI (--engine docker for a Docker image named "
        "python)",
    )
    run.add_argument(
        "-c",
        "--code",
        metavar="CODE",
        help="bacq run python: run this code instead of a script file",
    )
    run.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="PATH",
        help="bacq run python: a local module (file or package folder) the script imports; "
        "it travels with the script (repeatable)",
    )
    run.add_argument(
        "--fuel", type=int, metavar="N", help="wasm: the job's fuel budget (the worker's default)"
    )
    run.add_argument(
        "image", help="Docker image (bacq-test/debian:bookworm), wasm module, or python"
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments")
    run.set_defaults(func=cmd_run)

    create = add_command(
        sub,
        common,
        "create",
        description="Submit the job in FILE (YAML or JSON; - reads stdin) and print its id; "
        "--wait follows it like `bacq run`. `bacq run --dry-run ...` writes such a file. FILE "
        "may hold many jobs: a YAML list, YAML documents separated by ---, or JSON lines (one "
        "job object per line); they are checked first (each problem names the job, from 0, and "
        "its line), then submitted in batches, and their ids printed in file order. A file "
        "with a bad job submits nothing unless --skip-invalid.",
    )
    create.add_argument(
        "-f", "--file", required=True, metavar="FILE", help="job file, or - for stdin"
    ).complete = FILE_COMPLETION  # type: ignore[attr-defined]
    create.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="follow the job to its verdict (default: print the id and return); with many "
        "jobs, wait for all and print each one's state",
    )
    create.add_argument(
        "--skip-invalid",
        action="store_true",
        help="many jobs: submit the valid ones even when others have problems (those are "
        "listed on stderr; only the submitted jobs' ids are printed)",
    )
    _follow_flags(create)
    create.set_defaults(func=cmd_create)

    validate = add_command(
        sub,
        common,
        "validate",
        description="Check FILE (YAML or JSON; - reads stdin); each problem names the field and "
        "its line. Exit 0 when valid, 2 when not.",
    )
    validate.add_argument(
        "-f", "--file", required=True, metavar="FILE", help="job file, or - for stdin"
    ).complete = FILE_COMPLETION  # type: ignore[attr-defined]
    output_flag(validate)
    validate.set_defaults(func=cmd_validate)


def _follow_flags(parser: argparse.ArgumentParser) -> None:
    """What run and create share once the job is submitted."""
    parser.add_argument("--id-only", action="store_true", help="print only the job id and return")
    parser.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="submitting again with the same key returns the same job (with many jobs, job N "
        "gets KEY-N)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the job as YAML (a job file) and stop"
    )
    output_flag(parser)
    connection_flags(parser, ipfs=True)


def spec_from_run_args(args: argparse.Namespace) -> dict[str, Any]:
    """The job spec (not yet checked) that ``bacq run``'s arguments describe."""
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    inputs = []
    for volume in args.input:
        cid, path = pair(volume, ":", "input volume (-v)", "CID:/path/in/container")
        inputs.append({"cid": cid, "path": path})
    outputs = []
    for volume in args.output_volume:
        name, path = pair(volume, ":", "output volume (-o)", "NAME:/path/in/container")
        outputs.append({"name": name, "path": path})
    spec: dict[str, Any] = {
        "image": args.image,
        "command": command,
        "inputs": inputs,
        "outputs": outputs,
        "env": key_values(args.env, "environment variable (-e)"),
        "labels": key_values(args.label, "label (--label)"),
        "node_selector": key_values(args.select, "node selector (--select)"),
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
    for flag in ("deterministic", "no_cache", "live_logs"):
        if getattr(args, flag, False):
            spec[flag] = True
    if args.entrypoint is not None:
        spec["entrypoint"] = [args.entrypoint]
    if args.workdir is not None:
        spec["working_dir"] = args.workdir
    return spec


def _wasm_target(args: argparse.Namespace) -> str | None:
    """What a wasm run runs: "python", a module CID or local file; None for a Docker job."""
    if args.engine == "wasm" or (args.engine is None and args.image == "python"):
        return str(args.image)
    if args.code or args.module or args.fuel is not None:
        flag = "-c" if args.code else "--module" if args.module else "--fuel"
        raise UsageError(f"{flag} is for wasm jobs: bacq run python ... or --engine wasm MODULE")
    return None


async def _wasm_spec(args: argparse.Namespace, target: str) -> JobSpec:
    """The spec of ``bacq run --engine wasm MODULE`` / ``bacq run python``: a local module or
    script is added to IPFS first."""
    from pathlib import Path

    from bacq.storage import Storage
    from bacq.wasmjobs import check_script, cli_spec

    fields = spec_from_run_args(args)
    for docker_only in ("image", "command", "entrypoint", "working_dir", "network"):
        fields.pop(docker_only, None)
    if args.fuel is not None:
        fields["fuel"] = args.fuel
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    code = args.code
    if target == "python" and command[:1] == ["-c"]:  # bacq run python -c CODE [ARGS]
        if len(command) < 2:
            raise UsageError("-c needs the code to run: bacq run python -c 'print(42)'")
        code, command = command[1], command[2:]
    if target == "python" and code is None and command:
        check_script(Path(command[0]))  # a missing script is said before kubo is reached
    inputs = [(v["cid"], v["path"]) for v in fields.pop("inputs")]
    outputs = [(v["name"], v["path"]) for v in fields.pop("outputs")]
    storage = await Storage.connect(ipfs_api(args))
    try:
        return await cli_spec(
            storage,
            target,
            command,
            code=code,
            modules=[Path(m) for m in args.module],
            inputs=inputs,
            outputs=outputs,
            **fields,
        )
    finally:
        await storage.close()


def cmd_run(args: argparse.Namespace) -> Any:
    target = _wasm_target(args)
    if target is None and not args.dry_run and (args.id_only or not args.wait):
        # submitted as the arguments wrote it: the requester checks it with the same parse_spec
        # and answers the same problems, so this path never builds the spec's pydantic models;
        # over a blocking connection (bacq.corenats) when it can: no asyncio, no nats-py
        fields = spec_from_run_args(args)
        done = submit_quick(args, fields)
        return submit_raw(args, fields) if done is None else done
    if target is None and not args.dry_run and args.output in ("json", "yaml"):
        # waited for, for a program: the same, then the record followed over that connection
        # to its end and printed as the requester wrote it (no live view, no record model)
        fields = spec_from_run_args(args)
        done = follow_quick(args, fields)
        if done is not None:
            return done
    return _run(args, target)


async def _run(args: argparse.Namespace, target: str | None) -> int:
    from bacq.spec import parse_spec

    spec = (
        parse_spec(spec_from_run_args(args)) if target is None else await _wasm_spec(args, target)
    )
    if args.dry_run:
        from bacq.jobfile import spec_to_yaml

        print(spec_to_yaml(spec), end="")
        return EXIT_OK
    return await submit_and_follow(args, spec, wait=args.wait)


async def cmd_create(args: argparse.Namespace) -> int:
    from bacq.jobfile import load_jobs_file, spec_to_yaml

    jobs = load_jobs_file(args.file)
    if not jobs.many:
        (spec,) = [spec for _, spec in jobs.valid]  # one job: its problems were raised
        if args.dry_run:
            print(spec_to_yaml(spec), end="")
            return EXIT_OK
        return await submit_and_follow(args, spec, wait=args.wait)
    return await create_many(args, jobs)


def cmd_validate(args: argparse.Namespace) -> int:
    from bacq.jobfile import JobFileError, load_jobs_file

    jobs = load_jobs_file(args.file)
    if jobs.problems:
        bad = len({p.index for p in jobs.problems})
        raise JobFileError(
            jobs.source,
            jobs.problems,
            summary=f"{jobs.source}: {bad} of its {len(jobs.specs)} jobs have problems",
        )
    specs = [spec for _, spec in jobs.valid]
    if args.output in ("json", "yaml"):
        report: dict[str, Any] = {"valid": True, "file": jobs.source}
        if jobs.many:
            report["specs"] = [spec.model_dump(mode="json") for spec in specs]
        else:
            report["spec"] = specs[0].model_dump(mode="json")
        emit(report, args.output)
    elif jobs.many:
        out().print(f"[green]valid[/]: {jobs.source} holds {len(specs)} jobs")
    else:
        spec = specs[0]
        out().print(
            f"[green]valid[/]: {jobs.source} runs {spec.image} on {spec.concurrency} worker(s), "
            f"verifier {spec.verifier}"
        )
    return EXIT_OK


async def output_tails(
    args: argparse.Namespace, job: JobRecord
) -> tuple[bytes | None, bytes | None, str]:
    """The ends of the accepted result's stdout and stderr, read from kubo (best effort): with
    the blocking client (bacq.kubo, in a thread), or Storage for another kind of address."""
    import asyncio

    from bacq.errors import BacqError, IpfsUnavailable
    from bacq.kubo import KuboHttp

    if job.result_cid is None:
        return None, None, ""
    unreachable = f"(output not shown: no kubo at {ipfs_api(args)}; try `bacq logs {job.id}`)"
    kubo = KuboHttp.for_maddr(ipfs_api(args), timeout=15.0)
    if kubo is None:
        return await _output_tails_storage(args, job, unreachable)
    tails: list[bytes | None] = []
    for name in ("stdout", "stderr"):
        try:
            tails.append(await asyncio.to_thread(kubo.read_tail, f"{job.result_cid}/{name}"))
        except IpfsUnavailable:
            return None, None, unreachable
        except BacqError:
            tails.append(None)
    return tails[0], tails[1], ""


async def _output_tails_storage(
    args: argparse.Namespace, job: JobRecord, unreachable: str
) -> tuple[bytes | None, bytes | None, str]:
    from bacq.errors import BacqError
    from bacq.storage import Storage

    try:
        storage = await Storage.connect(ipfs_api(args), timeout=15.0)
    except BacqError:
        return None, None, unreachable
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


def _quick_connection(args: argparse.Namespace, fields: dict[str, Any]) -> Connection | None:
    """The client's connection over ``bacq.corenats``, or None when it needs nats-py (TLS,
    creds, nkeys). Should NATS be out of reach, ``fields`` is checked first, so that a bad spec
    is reported as such (SpecError) rather than as the connection's failure."""
    from bacq import corenats
    from bacq.auth import NatsOptions
    from bacq.errors import NatsUnavailable

    try:
        return corenats.connect(nats_url(args), NatsOptions.from_env("client"), name="bacq-client")
    except corenats.Unsupported:
        return None
    except NatsUnavailable:
        from bacq.spec import parse_spec

        parse_spec(fields)
        raise


def submit_quick(args: argparse.Namespace, fields: dict[str, Any]) -> int | None:
    """``submit_raw`` over ``bacq.corenats``; None when the connection needs nats-py."""
    from bacq import submission

    url = nats_url(args)
    conn = _quick_connection(args, fields)
    if conn is None:
        return None
    with conn:
        job_id = submission.submit_one_quick(
            conn, url, fields, idempotency_key=args.idempotency_key
        )
    print(job_id, flush=True)
    return EXIT_OK


def follow_quick(args: argparse.Namespace, fields: dict[str, Any]) -> Any:
    """``bacq run --output json|yaml`` (waiting) over ``bacq.corenats``: submit ``fields`` as
    ``submit_quick`` does, follow the job's record (``corenats.follow_key``) to its end, print
    it. None when the connection needs nats-py; should the connection drop while following, the
    job is followed on through the client (nats-py, which reconnects)."""
    import json

    from bacq import corenats, subjects, submission
    from bacq.errors import RequestRejected
    from bacq.states import JOB_FINAL

    url = nats_url(args)
    conn = _quick_connection(args, fields)
    if conn is None:
        return None

    def final(value: bytes) -> bool:
        record = json.loads(value)
        return isinstance(record, dict) and record.get("state") in JOB_FINAL

    last: bytes | None = None
    with conn:
        job_id = submission.submit_one_quick(
            conn, url, fields, idempotency_key=args.idempotency_key
        )
        try:
            for value in corenats.follow_key(conn, subjects.JOBS_BUCKET, job_id, final):
                last = value
        except KeyboardInterrupt:
            err().print(
                f"detached: job {job_id} goes on. Follow it with `bacq logs -f {job_id}`, "
                f"see it with `bacq describe {job_id}`"
            )
            return EXIT_INTERRUPTED
        except (OSError, ValueError, corenats.NoResponders, RequestRejected):
            # the connection dropped, JetStream refused the watch, or a record we cannot
            # read: the client's way (it reconnects, polls, and says what is wrong)
            last = None
    if last is None or not final(last):
        return _follow_with_client(args, job_id)
    record = json.loads(last)
    emit(record, args.output)
    if record.get("state") != "accepted":
        return EXIT_FAILED
    return EXIT_COMMAND_FAILED if record.get("exit_code") else EXIT_OK


async def _follow_with_client(args: argparse.Namespace, job_id: str) -> int:
    from bacq.client import Client

    async with await Client.connect(nats_url(args)) as client:
        return await follow(args, client, job_id)


async def submit_raw(args: argparse.Namespace, fields: dict[str, Any]) -> int:
    """Submit ``fields`` (a spec as ``bacq run``'s arguments wrote it, unchecked) and print the
    job id. The requester checks it (SpecError with its problems, as ``parse_spec`` here would
    raise); should NATS be out of reach, the spec is checked here first, so that a bad spec is
    reported as such rather than as the connection's failure."""
    lean_nats()
    from bacq import submission
    from bacq.errors import NatsUnavailable

    url = nats_url(args)
    try:
        nc = await submission.connect(url)
    except NatsUnavailable:
        from bacq.spec import parse_spec

        parse_spec(fields)  # raises SpecError for a bad spec
        raise
    try:
        job_id = await submission.submit_one(nc, url, fields, idempotency_key=args.idempotency_key)
    finally:
        await nc.close()
    print(job_id, flush=True)
    return EXIT_OK


async def submit_and_follow(args: argparse.Namespace, spec: JobSpec, *, wait: bool) -> int:
    """Submit ``spec``; print its id (``--no-wait``/``--id-only``) or follow it to its verdict."""
    if args.id_only or not wait:
        # a plain NATS connection: no JetStream lookup, no message models, no kubo client
        from bacq import submission

        nc = await submission.connect(nats_url(args))
        try:
            job_id = await submission.submit_one(
                nc,
                nats_url(args),
                spec.model_dump(mode="json"),
                idempotency_key=args.idempotency_key,
            )
        finally:
            await nc.close()
        print(job_id, flush=True)
        return EXIT_OK
    from bacq.client import Client

    async with await Client.connect(nats_url(args)) as client:
        job_id = await client.submit(spec, idempotency_key=args.idempotency_key)
        return await follow(args, client, job_id)


async def create_many(args: argparse.Namespace, jobs: JobsFile) -> int:
    """``bacq create -f`` of a file of many jobs: check all, submit in batches, print the ids in
    file order; ``--wait`` then waits for all of them."""
    import time

    from bacq import submission
    from bacq.jobfile import JobFileError, spec_to_yaml

    total = len(jobs.specs)
    bad = sorted({p.index for p in jobs.problems if p.index is not None})
    if bad and not args.skip_invalid:
        raise JobFileError(
            jobs.source,
            jobs.problems,
            summary=f"{jobs.source}: {len(bad)} of its {total} jobs have problems; nothing was "
            "submitted (fix them, or --skip-invalid submits the others)",
        )
    if bad:
        _print_problems(jobs.problems, jobs.source)
        err().print(
            f"[yellow]skipping {len(bad)} of {total} jobs[/] with problems (jobs "
            + ", ".join(str(i) for i in bad[:20])
            + (", …" if len(bad) > 20 else "")
            + f"); submitting the other {total - len(bad)}"
        )
    valid = jobs.valid
    if args.dry_run:
        print("---\n".join(spec_to_yaml(spec) for _, spec in valid), end="")
        return EXIT_OK
    keys = (
        [f"{args.idempotency_key}-{index}" for index, _ in valid] if args.idempotency_key else None
    )
    started = time.monotonic()
    url = nats_url(args)
    nc = await submission.connect(url)
    try:
        outcomes = await submission.submit_many(
            nc, url, [spec.model_dump_json().encode() for _, spec in valid], keys
        )
    finally:
        await nc.close()
    took = time.monotonic() - started
    waiting = args.wait and not args.id_only
    job_ids: list[str] = []
    refused = 0
    for (index, _), outcome in zip(valid, outcomes, strict=True):
        if outcome.job_id is not None:
            job_ids.append(outcome.job_id)
            if not waiting:  # waiting: the ids come with the outcomes
                print(outcome.job_id)
            continue
        refused += 1
        for field, message in outcome.problems or [("job", outcome.error or "refused")]:
            err().print(f"[red]refused:[/] {jobs.source}: job {index}: [bold]{field}[/]: {message}")
    sys.stdout.flush()
    if sys.stderr.isatty():
        err().print(
            f"submitted {len(job_ids)} jobs in {took:.2f}s ({len(job_ids) / max(took, 1e-6):.0f}/s)"
        )
    if refused:
        err().print(
            f"[red]error:[/] the requester refused {refused} of {len(valid)} jobs (listed "
            "above); the others were submitted"
        )
        return EXIT_FAILED
    if not waiting:
        return EXIT_OK
    return await _wait_many(args, job_ids)


def _print_problems(problems: list[FileProblem], source: str) -> None:
    from rich.markup import escape

    for problem in problems[:100]:
        where = f"{source}:{problem.line}" if problem.line else source
        err().print(
            f"  {where}: job {problem.index}: [bold]{escape(problem.field)}[/]: "
            f"{escape(problem.message)}"
        )
    if len(problems) > 100:
        err().print(f"  … and {len(problems) - 100} more problems")


async def _wait_many(args: argparse.Namespace, job_ids: list[str]) -> int:
    import asyncio

    from bacq.client import Client
    from bacq.states import JobState

    err().print(f"waiting for {len(job_ids)} jobs (Ctrl-C stops waiting; the jobs go on)")
    try:
        async with await Client.connect(nats_url(args)) as client:
            done = await client.wait_all(job_ids)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\n".join(job_ids), flush=True)
        err().print(f"detached: the {len(job_ids)} jobs (ids above) go on")
        return EXIT_INTERRUPTED
    records = [done[job_id] for job_id in job_ids]
    if args.output in ("json", "yaml"):
        emit([job.model_dump(mode="json") for job in records], args.output)
    else:
        for job in records:
            exit_code = "" if job.exit_code is None else f" exit {job.exit_code}"
            print(f"{job.id} {job.state.value}{exit_code}")
    if any(job.state != JobState.ACCEPTED for job in records):
        return EXIT_FAILED
    return EXIT_COMMAND_FAILED if any(job.exit_code for job in records) else EXIT_OK


async def follow(args: argparse.Namespace, client: Any, job_id: str) -> int:
    """Follow a submitted job: a live view on a terminal, plain progress lines otherwise; then the
    verdict (or the record, with ``--output json|yaml``)."""
    import asyncio
    import time
    from collections.abc import Callable

    # the live view and the verdict (rich) only for a human: --output json|yaml needs neither
    started = time.monotonic()
    machine = args.output in ("json", "yaml")
    live = None
    on_change: Callable[[JobRecord], None]
    if not machine and sys.stdout.isatty():
        from rich.live import Live

        from bacq.render import LiveView

        view = LiveView(job_id)
        live = Live(view, console=out(), refresh_per_second=4, transient=False)
        on_change = view.update
    else:
        seen: dict[str, str] = {}
        if not machine:
            from bacq.render import plain_progress

            err().print(
                f"job [bold]{job_id}[/] submitted; waiting (Ctrl-C detaches, the job goes on)"
            )

        def on_change(job: JobRecord) -> None:
            if not machine:
                for line in plain_progress(job, seen):
                    err().print(line)

    try:
        if live is not None:
            with live:
                job = await client.wait(job_id, on_change=on_change)
        else:
            job = await client.wait(job_id, on_change=on_change)
    except (KeyboardInterrupt, asyncio.CancelledError):
        err().print(
            f"detached: job {job_id} goes on. Follow it with `bacq logs -f {job_id}`, "
            f"see it with `bacq describe {job_id}`"
        )
        return EXIT_INTERRUPTED
    if machine:
        emit(job.model_dump(mode="json"), args.output)
        return job_exit_code(job)
    stdout, stderr, note = await output_tails(args, job)
    from bacq.render import render_verdict

    render_verdict(
        out(),
        job,
        elapsed=time.monotonic() - started,
        stdout=stdout,
        stderr=stderr,
        output_note=note,
        tail_lines=TAIL_LINES,
    )
    return job_exit_code(job)
