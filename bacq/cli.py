"""The ``bacq`` command: the user's entry to everything (client commands, services, devstack).

This module is the parser's skeleton and the dispatch; the commands live in ``bacq.commands``, one
module per group, each registering its own arguments (see that package's docstring). Touches what
the chosen command touches: NATS and kubo for client commands, Docker for workers, local
processes for ``devstack``. User errors print one line (what went wrong, what to do) and exit
non-zero; ``--debug`` shows the traceback.

Exit codes: 0 the job was accepted (and its command exited 0) or the command succeeded;
1 the job failed, was void or cancelled, or an operation failed; 2 bad usage or an invalid spec;
3 the job was accepted but its command exited non-zero; 130 interrupted (a waited-on job goes on).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from typing import Any

from bacq.commands.common import (
    COMMAND_HELP,
    EPILOG,
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Parser,
    UsageError,
    add_command,
    defer_import,
    export_nats_flags,
    parse_since,
)

__all__ = ["GROUPS", "UsageError", "build_parser", "main", "parse_since"]

# the command groups, in the order of `bacq --help`: each a module of bacq.commands with a
# register(sub, common) function (adding a group: a module there and a line here)
GROUPS = (
    "bacq.commands.submit",  # run, create, validate
    "bacq.commands.jobs",  # list, describe, cancel, history, events
    "bacq.commands.results",  # logs, get
    "bacq.commands.nodes",  # nodes
    "bacq.commands.ipfs",  # ipfs add
    "bacq.commands.misc",  # schema, version, doctor, completion
    "bacq.commands.services",  # devstack, requester, verifier, worker
    "bacq.commands.lab",  # lab up, status, down
)


# the commands of each group: `bacq COMMAND ...` builds the parser of COMMAND's group alone (a
# whole parser is some 300 arguments, a third of a quick command's start-up); a unit test checks
# this table against what the groups register
COMMANDS = {
    "bacq.commands.submit": ("run", "create", "validate"),
    "bacq.commands.jobs": ("list", "ls", "describe", "cancel", "history", "events"),
    "bacq.commands.results": ("logs", "get"),
    "bacq.commands.nodes": ("nodes",),
    "bacq.commands.ipfs": ("ipfs",),
    "bacq.commands.misc": ("schema", "version", "doctor", "completion"),
    "bacq.commands.services": ("devstack", "requester", "verifier", "worker"),
    "bacq.commands.lab": ("lab",),
}
GROUP_OF = {command: group for group, commands in COMMANDS.items() for command in commands}

SERVICES = ("requester", "verifier", "worker")  # long-running: JSON logs at INFO


def command_of(argv: list[str]) -> str | None:
    """The command ``argv`` names (its first word after ``--debug``), if it names one."""
    for word in argv:
        if word == "--debug":
            continue
        return word if word in GROUP_OF else None
    return None


def build_parser(command: str | None = None, *, outline: bool = False) -> argparse.ArgumentParser:
    """The whole parser, or (``command``) the one of that command's group alone: it parses that
    command's arguments the same way, and fails the same way on them. ``outline`` (no
    ``command``): every command without its arguments, for what names none (``bacq --help``,
    ``bacq``, a misspelt command): the same help and the same errors."""
    common = Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
    )
    parser: argparse.ArgumentParser = Parser(
        prog="bacq",
        description="Compute over content-addressed data: run Docker jobs on IPFS inputs, "
        "verified by a quorum of workers.",
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True, parser_class=Parser)
    if outline and command not in GROUP_OF:
        for name in COMMAND_HELP:
            add_command(sub, common, name)
        return parser
    for group in (GROUP_OF[command],) if command in GROUP_OF else GROUPS:
        importlib.import_module(group).register(sub, common)
    return parser


def _configure_logging(args: argparse.Namespace, debug: bool) -> None:
    """Services log JSON lines at INFO; other commands log warnings only, set up lazily (structlog
    is imported by the first log line, if any)."""
    from bacq.log import configure

    service = args.cmd in SERVICES
    configure(
        json=True if service or os.environ.get("BACQ_LOG_JSON") else None,
        level=None if service or debug else "WARNING",
        lazy=not service,
    )


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_of(words), outline=True)
    args = parser.parse_args(words)
    debug = bool(getattr(args, "debug", False) or os.environ.get("BACQ_DEBUG"))
    export_nats_flags(args)
    _configure_logging(args, debug)
    defer_import("aiohttp")  # nats-py imports it for ws:// servers only
    if args.cmd not in SERVICES:
        # pydantic looks for plugins among every installed distribution's entry points when it
        # builds its first model (a third of `bacq run --no-wait`'s start); a client has none
        os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    try:
        result = args.func(args)
        if hasattr(result, "__await__"):
            import asyncio

            result = asyncio.run(result)
        return int(result or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`bacq events | head`): stop quietly, as a tool killed by
        # SIGPIPE does, and keep Python from complaining about stdout at exit
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        if debug:
            raise
        return _report(exc)


SHOWN_PROBLEMS = 100  # problems of a job file listed before "… and N more"


def _report(exc: Exception) -> int:
    """One line per problem, no traceback (``--debug`` shows it); returns the exit code."""
    from rich.markup import escape

    from bacq.commands.common import err
    from bacq.errors import BacqError, ConfigError, SpecError
    from bacq.jobfile import JobFileError

    console = err()
    if isinstance(exc, JobFileError):
        if all(p.field == "file" for p in exc.problems):  # unreadable, not YAML, not a mapping
            for problem in exc.problems:
                where = f"{exc.source}:{problem.line}" if problem.line else exc.source
                console.print(f"[red]error:[/] {where}: {escape(problem.message)}")
            return EXIT_USAGE
        console.print(f"[red]error:[/] {exc.summary or f'{exc.source} is not a valid job file'}")
        problems = sorted(exc.problems, key=lambda p: (p.index or 0, p.line or 0))
        for problem in problems[:SHOWN_PROBLEMS]:
            where = f"{exc.source}:{problem.line}" if problem.line else exc.source
            job = f"job {problem.index}: " if problem.index is not None else ""
            console.print(
                f"  {where}: {job}[bold]{escape(problem.field)}[/]: {escape(problem.message)}"
            )
        if len(problems) > SHOWN_PROBLEMS:
            console.print(f"  … and {len(problems) - SHOWN_PROBLEMS} more problems")
        return EXIT_USAGE
    if isinstance(exc, SpecError):
        console.print("[red]error:[/] invalid job spec")
        for field, message in exc.problems:
            console.print(f"  [bold]{field}[/]: {message}")
        return EXIT_USAGE
    if isinstance(exc, (UsageError, ConfigError)):
        console.print(f"[red]error:[/] {exc}")
        return EXIT_USAGE
    if isinstance(exc, BacqError):
        console.print(f"[red]error:[/] {exc}")
        return EXIT_FAILED
    console.print(
        f"[red]error:[/] unexpected {type(exc).__name__}: {exc}; rerun with --debug for the "
        "traceback and report it"
    )
    return EXIT_FAILED


def __getattr__(name: str) -> Any:
    """Names that moved to ``bacq.commands`` and are still imported from here."""
    if name == "_serve":
        from bacq.commands.services import serve

        return serve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
