"""``bacq ipfs ...``: IPFS helpers (``add``). Touches kubo and the files given."""

from __future__ import annotations

import argparse
from typing import Any

from bacq.commands.common import (
    EXIT_OK,
    FILE_COMPLETION,
    Parser,
    add_command,
    connection_flags,
    ipfs_api,
)

__all__ = ["register"]


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    ipfs = add_command(sub, common, "ipfs")
    ipfs_sub: Any = ipfs.add_subparsers(
        dest="ipfs_cmd", metavar="COMMAND", required=True, parser_class=Parser
    )
    add = ipfs_sub.add_parser(
        "add", help="add files or folders; prints one CID per path", parents=[common]
    )
    paths = add.add_argument("paths", nargs="+", metavar="PATH")
    paths.complete = FILE_COMPLETION
    connection_flags(add, ipfs=True)
    add.set_defaults(func=cmd_ipfs_add)


def cmd_ipfs_add(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from bacq.kubo import KuboHttp

    # the blocking client (no asyncio, aiohttp or aioipfs to import); Storage for another kind
    # of address, which it reports
    kubo = KuboHttp.for_maddr(ipfs_api(args))
    if kubo is None:
        return _add_with_storage(args)
    for path in args.paths:
        print(kubo.add(Path(path)), flush=True)
    return EXIT_OK


async def _add_with_storage(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bacq.storage import Storage

    storage = await Storage.connect(ipfs_api(args))
    try:
        for path in args.paths:
            print(await storage.add(Path(path)))
    finally:
        await storage.close()
    return EXIT_OK
