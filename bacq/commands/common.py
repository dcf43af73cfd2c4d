"""What the ``bacq`` subcommands share: exit codes, the usage error, the parser class, connection
and output flags, ``--since``, consoles and machine output.

Touches the process environment (``BACQ_NATS_*`` from the NATS flags) and stdout/stderr. Imports
only the standard library and ``bacq.errors`` at the top, so that any command can import it without
slowing the start of ``bacq``; rich is loaded on first use of a console.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import re
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from bacq.errors import BacqError

if TYPE_CHECKING:
    from rich.console import Console

    from bacq.models import JobRecord

__all__ = [
    "DEFAULT_IPFS_API",
    "DEFAULT_NATS_URL",
    "DIRECTORY_COMPLETION",
    "EPILOG",
    "EXIT_BROKEN_PIPE",
    "EXIT_COMMAND_FAILED",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "FILE_COMPLETION",
    "FORMATS",
    "JOB_ID_COMPLETION",
    "Parser",
    "UsageError",
    "connection_flags",
    "emit",
    "err",
    "export_nats_flags",
    "ipfs_api",
    "job_exit_code",
    "job_id_argument",
    "key_values",
    "nats_url",
    "out",
    "output_flag",
    "pair",
    "parse_since",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_COMMAND_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command that SIGPIPE ended

# the same values as bacq.bus.DEFAULT_NATS_URL and bacq.storage.DEFAULT_IPFS_API (a test checks),
# written out here so that --help need not import NATS or aiohttp
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_IPFS_API = "/ip4/127.0.0.1/tcp/5001"

FORMATS = ("table", "json", "yaml")

EPILOG = (
    "Exit codes: 0 ok/accepted, 1 failed/void/cancelled/error, 2 bad usage or spec, "
    "3 accepted but the command exited non-zero, 130 interrupted (the job goes on), "
    "141 its output was closed (| head)."
)


class UsageError(BacqError):
    """A command-line argument is malformed (exit 2). The one usage error of every command."""


# -- consoles: rich only when a command prints something styled -----------------------------------
@functools.cache
def out() -> Console:
    """The console for results (stdout). Piped output is not cut to 80 columns: ids and CIDs stay
    whole for the next program."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


@functools.cache
def err() -> Console:
    """The console for progress and errors (stderr)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def emit(data: Any, fmt: str) -> None:
    """Print ``data`` as JSON or YAML on stdout (plain print: never wrapped or styled)."""
    if fmt == "yaml":
        import yaml

        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    else:
        import json

        print(json.dumps(data, indent=2))


def job_exit_code(job: JobRecord) -> int:
    from bacq.states import JobState

    if job.state != JobState.ACCEPTED:
        return EXIT_FAILED
    return EXIT_COMMAND_FAILED if job.exit_code else EXIT_OK


# -- argument helpers ------------------------------------------------------------------------------
def pair(text: str, sep: str, what: str, example: str) -> tuple[str, str]:
    left, found, right = text.partition(sep)
    if not found or not left or not right:
        raise UsageError(f"{what} {text!r} must look like {example}")
    return left, right


def key_values(items: list[str], what: str) -> dict[str, str]:
    return dict(pair(item, "=", what, "KEY=VALUE") for item in items)


def nats_url(args: argparse.Namespace) -> str:
    return str(getattr(args, "nats", None) or os.environ.get("BACQ_NATS_URL") or DEFAULT_NATS_URL)


def ipfs_api(args: argparse.Namespace) -> str:
    return str(getattr(args, "ipfs", None) or os.environ.get("BACQ_IPFS_API") or DEFAULT_IPFS_API)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
SINCE_HELP = (
    "30s, 10m, 2h, 1d, 1w ago, or a date/time (2026-01-31, 2026-01-31T12:00; local time "
    "unless it names a zone, e.g. 2026-01-31T12:00Z)"
)


def parse_since(text: str, at: dt.datetime | None = None) -> dt.datetime:
    """``--since`` of every command: a duration back from ``at`` (now) — 30s, 10m, 2h, 1d, 1w — or
    an ISO 8601 date/time. A time without a zone is the machine's local time (as ``bacq list``
    shows times); ``Z`` or ``+00:00`` makes it UTC."""
    cleaned = text.strip()
    match = _DURATION.match(cleaned.lower())
    at = at or dt.datetime.now(dt.UTC)
    if match:
        return at - dt.timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        moment = dt.datetime.fromisoformat(cleaned)
    except ValueError:
        raise UsageError(
            f"--since {text!r} is neither a duration (30s, 10m, 2h, 1d, 1w) nor a date "
            "(2026-01-31, 2026-01-31T12:00 or 2026-01-31T12:00Z)"
        ) from None
    return moment if moment.tzinfo else moment.astimezone()


# -- completion ----------------------------------------------------------------------------------
# shtab's FILE and DIRECTORY, written out so that building the parser does not import shtab
FILE_COMPLETION = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
DIRECTORY_COMPLETION = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}
# job ids complete from `bacq list -q` (given 3 s: a Tab must not hang when NATS is away)
JOB_ID_COMPLETION = {"bash": "_bacq_compgen_job_ids", "zsh": "_bacq_job_ids"}


def job_id_argument(parser: argparse.ArgumentParser) -> None:
    """The JOB_ID positional, completed from the running network's job ids."""
    action = parser.add_argument(
        "job_id", metavar="JOB_ID", help="job id (a unique prefix will do)"
    )
    action.complete = JOB_ID_COMPLETION  # type: ignore[attr-defined]


# -- the parser ------------------------------------------------------------------------------------
def _say_error(message: str) -> None:
    red = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
    prefix = "\x1b[31merror:\x1b[0m" if red else "error:"
    print(f"{prefix} {message}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in bacq's one-line style (still exit 2)."""

    def error(self, message: str) -> NoReturn:
        _say_error(f"{message}; see `{self.prog} --help`")
        raise SystemExit(EXIT_USAGE)


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


def export_nats_flags(args: argparse.Namespace) -> None:
    for dest, (_, _, env, _) in _NATS_AUTH_FLAGS.items():
        value = getattr(args, dest, None)
        if value:
            os.environ[env] = str(value)


def connection_flags(parser: argparse.ArgumentParser, *, ipfs: bool = False) -> None:
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


def output_flag(parser: argparse.ArgumentParser, choices: tuple[str, ...] = FORMATS) -> None:
    parser.add_argument(
        "--output",
        choices=choices,
        default=choices[0],
        help=f"{choices[0]} for people (default); "
        + " or ".join(c for c in choices[1:])
        + " for programs",
    )


# every command's line in `bacq --help`, in its order: the groups register their commands with
# these (``add_command``), and `bacq --help` alone is built from them, without loading the groups
# and their some 300 arguments (a unit test checks that both give the same help)
COMMAND_HELP = {
    "run": "run a job and follow it to its verdict",
    "create": "submit the job(s) of a YAML or JSON job file",
    "validate": "check a job file without submitting it",
    "list": "list jobs, newest first",
    "describe": "a job's spec, per-node states, CIDs and verdict",
    "cancel": "cancel a job: stop its containers, free the workers",
    "history": "a job's full event history, replayed from JetStream",
    "events": "every job's events from a point on, optionally live",
    "logs": "a job's stdout and stderr (live while it runs)",
    "get": "download a job's accepted results",
    "nodes": "workers seen: labels, capacity, jobs, heartbeat, verification",
    "ipfs": "IPFS helpers",
    "schema": "print the JSON Schema of a job spec (and of job files)",
    "version": "print the versions of bacq and its libraries",
    "doctor": "check NATS, kubo and Docker: reachable? which versions? how to fix",
    "completion": "print a shell completion script (bash or zsh)",
    "devstack": "run a whole bacq network locally until Ctrl-C",
    "requester": "run the requester service",
    "verifier": "run the verifier service",
    "worker": "run a worker service",
    "lab": "a lab of simulated hosts in network namespaces (root): up, status, faults, chaos, down",
}
ALIASES = {"list": ["ls"]}


def add_command(
    sub: Any, common: argparse.ArgumentParser, name: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """A subcommand of ``bacq`` (its line of help from ``COMMAND_HELP``) with the shared
    ``--debug`` and the exit codes in its help."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=COMMAND_HELP[name],
        aliases=ALIASES.get(name, []),
        parents=[common],
        epilog=EPILOG,
        **kwargs,
    )
    return parser


class _Deferred(ModuleType):
    """Stands for a module in ``sys.modules`` until an attribute of it is needed."""

    def __getattr__(self, attr: str) -> Any:
        import importlib

        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def defer_import(name: str) -> None:
    """Make ``import name`` give a stand-in that imports the module on first attribute access.

    nats-py imports aiohttp (for WebSocket servers only) whenever aiohttp is installed, which
    aioipfs does: deferred, a command that talks plain NATS never loads it, and one that uses
    it (kubo, a ws:// server) loads it on first use as usual. (importlib's LazyLoader does not
    do: a second ``import`` of a lazy module loads it.)"""
    import importlib.util

    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    stand_in = _Deferred(name)
    stand_in.__spec__ = spec
    sys.modules[name] = stand_in


def lean_nats() -> None:
    """Import nats-py without its JetStream modules (about 50 dataclasses, a sixth of a quick
    submission's start-up): ``nats.js`` is a stand-in until an attribute of it is needed (nats-py
    reads one only for a reply with a status header, e.g. no responders, or for JetStream).
    For a command that talks core NATS only; a no-op once nats-py is loaded."""
    if "nats" in sys.modules or "nats.js" in sys.modules:
        return
    from importlib.machinery import ModuleSpec

    # not defer_import: finding a submodule's spec imports its package, nats.js included
    stand_in = _Deferred("nats.js")
    stand_in.__spec__ = ModuleSpec("nats.js", None)
    sys.modules["nats.js"] = stand_in
    import nats

    if "js" not in vars(nats):
        # `import nats.js` finding the stand-in in sys.modules does not bind it on the package
        nats.js = stand_in  # the attribute a real import would set
