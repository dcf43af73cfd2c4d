"""``bacq logs`` and ``bacq get``: a job's output, live from NATS or from its results in IPFS.

Touches NATS (the jobs bucket and the live-output stream, read-only), kubo (reads of results),
the output folder of ``get`` and stdout/stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from bacq.commands.common import (
    DIRECTORY_COMPLETION,
    EXIT_INTERRUPTED,
    EXIT_OK,
    UsageError,
    add_command,
    connection_flags,
    err,
    ipfs_api,
    job_id_argument,
    nats_url,
)

if TYPE_CHECKING:
    from bacq.models import JobRecord

__all__ = ["register"]


class _DeprecatedTimeout(argparse.Action):
    """``--timeout`` on logs/get: the old name of ``--ipfs-timeout`` (still read, with a note)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"note: {parser.prog} --timeout is now --ipfs-timeout (--timeout of `bacq run` is "
            "the job's runtime); the old name will go away",
            file=sys.stderr,
        )
        namespace.ipfs_timeout = values


def _ipfs_timeout_flag(parser: argparse.ArgumentParser, default: float, what: str) -> None:
    parser.add_argument(
        "--ipfs-timeout",
        type=float,
        default=default,
        metavar="SECONDS",
        help=f"seconds for {what} ({default:g})",
    )
    parser.add_argument("--timeout", type=float, action=_DeprecatedTimeout, help=argparse.SUPPRESS)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    logs = add_command(
        sub,
        common,
        "logs",
        description="Print the job's stdout (to stdout) and stderr (to stderr). While it runs, "
        "the output streamed by its workers; once it has results, the output in them (IPFS). "
        "Several workers: each line is prefixed with the node.",
    )
    job_id_argument(logs)
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    logs.add_argument("--node", metavar="NODE", help="only this worker's output")
    logs.add_argument(
        "--limit",
        type=int,
        default=16 * 1024 * 1024,
        metavar="BYTES",
        help="from results: the last BYTES of each stream (16 MiB)",
    )
    _ipfs_timeout_flag(logs, 60.0, "IPFS reads")
    logs.add_argument(
        "--output",
        choices=["text", "json"],
        default="text",
        help="text: the output as printed (default); json: one object per piece on stdout, "
        "with node_id, stream and text",
    )
    connection_flags(logs, ipfs=True)
    logs.set_defaults(func=cmd_logs)

    get = add_command(sub, common, "get")
    job_id_argument(get)
    get.add_argument(
        "--output-dir",
        metavar="DIR",
        help="where to put them (default: ./JOB_ID); must not exist or be empty",
    ).complete = DIRECTORY_COMPLETION  # type: ignore[attr-defined]
    _ipfs_timeout_flag(get, 300.0, "the download")
    connection_flags(get, ipfs=True)
    get.set_defaults(func=cmd_get)


class _LineWriter:
    """Writes chunks of output as whole lines, prefixed by the node when several nodes speak."""

    def __init__(self, prefix: bool, *, as_json: bool = False) -> None:
        self.prefix = prefix
        self.as_json = as_json  # one JSON object per piece, all on stdout
        self.partial: dict[tuple[str, str], str] = {}

    def write(self, node: str, stream: str, text: str, *, end: bool = False) -> None:
        if self.as_json:
            if text:
                import json

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
    import asyncio

    from bacq.client import Client
    from bacq.logs import read_logs
    from bacq.states import ExecState

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
                    err().print(
                        f"[dim][{chunk.node_id} {chunk.stream}: {chunk.skipped} bytes skipped][/]"
                    )
                writer.write(chunk.node_id, chunk.stream, chunk.text, end=chunk.eof)
        except (KeyboardInterrupt, asyncio.CancelledError):
            return EXIT_INTERRUPTED
        finally:
            if watcher is not None:
                watcher.cancel()
        if not job.final and not args.follow:
            err().print(f"[dim](job {job.id} is still {job.state}; -f follows it)[/]")
        elif job.final and not args.follow:
            err().print(
                f"[dim](job {job.id} is {job.state} and left no results; live output shown)[/]"
            )
    return EXIT_OK


async def _logs_from_results(args: argparse.Namespace, job: JobRecord) -> int:
    from bacq.errors import StorageError
    from bacq.storage import Storage

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
    storage = await Storage.connect(ipfs_api(args), timeout=args.ipfs_timeout)
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


def cmd_get(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from bacq.kubo import KuboHttp

    kubo = KuboHttp.for_maddr(ipfs_api(args), timeout=args.ipfs_timeout)
    record = None if kubo is None else _job_record(args)
    if kubo is None or record is None:  # a prefix of an id, or another kind of kubo address
        return _get_with_client(args)
    # the quick path: the record as plain JSON over a blocking NATS connection, the blocking
    # kubo client (no asyncio, nats-py, aiohttp or pydantic)
    result_cid = record.get("result_cid")
    if not isinstance(result_cid, str) or not result_cid:
        from bacq.errors import StorageError

        reason = record.get("reason")
        raise StorageError(
            f"job {args.job_id} has no accepted result (state {record.get('state')}"
            + (f": {reason}" if reason else "")
            + ")"
        )
    target = Path(args.output_dir or args.job_id)
    kubo.fetch(result_cid, target)
    outputs = (record.get("spec") or {}).get("outputs") or []
    names = [str(o.get("name")) for o in outputs if isinstance(o, dict)]
    print(  # plain: no console (rich) to load for one line
        f"results of {args.job_id} in {target}/ (stdout, stderr, exitCode"
        + "".join(f", {name}/" for name in names)
        + ")",
        file=sys.stderr,
    )
    return EXIT_OK


def _job_record(args: argparse.Namespace) -> dict[str, Any] | None:
    """The job record of exactly ``args.job_id`` as plain JSON (JetStream's message get, a core
    NATS request over ``bacq.corenats``: no JetStream context, no record model), or None when
    there is no such key (the caller then tries it as a prefix) or nats-py must do it."""
    import json

    from bacq import corenats, subjects
    from bacq.auth import NatsOptions

    job_id = args.job_id
    if not job_id or any(c in job_id for c in " .*>\t\r\n"):
        return None  # not a key: the client's path says what is wrong
    url = nats_url(args)
    try:
        with corenats.connect(url, NatsOptions.from_env("client"), name="bacq-client") as conn:
            value = corenats.last_value(conn, subjects.JOBS_BUCKET, job_id)
    except (corenats.Unsupported, corenats.NoResponders, OSError):
        return None  # the client's path (nats-py) answers, or says what is wrong
    if value is None:
        return None
    try:
        record = json.loads(value)
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("id") == job_id else None


async def _get_with_client(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bacq.client import Client
    from bacq.storage import Storage

    async with await Client.connect(nats_url(args)) as client:
        job = await client.job(args.job_id)
        target = Path(args.output_dir or job.id)
        storage = await Storage.connect(ipfs_api(args), timeout=args.ipfs_timeout)
        try:
            await client.fetch_results(storage, job, target)
        finally:
            await storage.close()
    err().print(
        f"results of {job.id} in {target}/ (stdout, stderr, exitCode"
        + "".join(f", {o.name}/" for o in job.spec.outputs)
        + ")"
    )
    return EXIT_OK
