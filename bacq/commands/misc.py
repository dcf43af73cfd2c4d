"""``bacq version``, ``doctor``, ``schema`` and ``completion``: about bacq itself and its setup.

Touches stdout; ``doctor`` also tries NATS, kubo and Docker (read-only).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from bacq.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    add_command,
    connection_flags,
    emit,
    ipfs_api,
    nats_url,
    out,
    output_flag,
)

__all__ = ["register", "versions"]

VERSION_OF = ("nats-py", "aioipfs", "docker", "pydantic", "rich")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    schema = add_command(sub, common, "schema")
    schema.set_defaults(func=cmd_schema)

    version = add_command(sub, common, "version")
    output_flag(version)
    version.set_defaults(func=cmd_version)

    doctor = add_command(
        sub,
        common,
        "doctor",
        description="Check that NATS (with JetStream and a requester), kubo and Docker answer; "
        "print their versions and, for each problem, how to fix it. Exit 1 when a required "
        "check fails (Docker and workers are only warnings: clients do not need them).",
    )
    output_flag(doctor)
    connection_flags(doctor, ipfs=True)
    doctor.set_defaults(func=cmd_doctor)

    completion = add_command(
        sub,
        common,
        "completion",
        description="Print the completion script for SHELL. bash: "
        "`bacq completion bash > ~/.local/share/bash-completion/completions/bacq`; zsh: "
        '`bacq completion zsh > "${fpath[1]}/_bacq"` (then start a new shell).',
    )
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(func=cmd_completion)


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from bacq.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def _dist_versions(names: tuple[str, ...]) -> dict[str, str]:
    """The versions of installed distributions, from the names of their ``.dist-info`` folders
    on ``sys.path`` (importlib.metadata reads far more, and costs a noticeable part of a
    second); what is not found that way is asked of importlib.metadata."""
    wanted = {re.sub(r"[-_.]+", "_", n).lower(): n for n in names}
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            listing = os.listdir(entry or ".")
        except OSError:
            continue
        for item in listing:
            if not item.endswith(".dist-info"):
                continue
            dist, _, version = item.removesuffix(".dist-info").partition("-")
            name = wanted.get(re.sub(r"[-_.]+", "_", dist).lower())
            if name and version and name not in found:
                found[name] = version
        if len(found) == len(names):
            break
    missing = [n for n in names if n not in found]
    if missing:
        import importlib.metadata

        for name in missing:
            try:
                found[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                found[name] = "not installed"
    return {name: found[name] for name in names}


def versions() -> dict[str, str]:
    """bacq's version, Python's and those of the libraries it runs on (read from their metadata,
    without importing them)."""
    import platform

    from bacq import __version__

    return {"bacq": __version__, "python": platform.python_version(), **_dist_versions(VERSION_OF)}


def cmd_version(args: argparse.Namespace) -> int:
    found = versions()
    if args.output in ("json", "yaml"):
        emit(found, args.output)
        return EXIT_OK
    print(f"bacq {found.pop('bacq')}")
    rest = ", ".join(f"{k} {v}" for k, v in found.items())
    dim = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(f"\x1b[2m{rest}\x1b[0m" if dim else rest)
    return EXIT_OK


async def cmd_doctor(args: argparse.Namespace) -> int:
    from bacq import __version__
    from bacq.doctor import run_checks

    checks = await run_checks(nats_url(args), ipfs_api(args))
    failed = [c for c in checks if not c.ok and c.required]
    if args.output in ("json", "yaml"):
        emit(
            {"ok": not failed, "version": __version__, "checks": [c.as_dict() for c in checks]},
            args.output,
        )
    else:
        console = out()
        for check in checks:
            mark = (
                "[green]✓[/]" if check.ok else ("[red]✗[/]" if check.required else "[yellow]![/]")
            )
            console.print(f"{mark} [bold]{check.name:<9}[/] {check.detail}")
            if not check.ok and check.fix:
                console.print(f"  [dim]fix:[/] {check.fix}")
        console.print("[green]all good[/]" if not failed else f"[red]{len(failed)} problem(s)[/]")
    return EXIT_FAILED if failed else EXIT_OK


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


def _NAMES_A_SITE(line: str) -> bool:
    return line.lstrip().startswith("#") and "://" in line


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    from bacq.cli import build_parser

    script = shtab.complete(
        build_parser(), shell=args.shell, preamble=COMPLETION_PREAMBLE[args.shell]
    )
    # shtab's header comments point at outside sites: a script installed on a user's machine
    # carries no address bacq did not choose
    print("\n".join(line for line in script.splitlines() if not _NAMES_A_SITE(line)))
    return EXIT_OK
