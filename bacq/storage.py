"""IPFS storage through a kubo node's RPC API (aioipfs): add a folder, fetch a CID safely, pin.

Touches the kubo node at the given multiaddr and the local paths it is handed, nothing else.
Every call has a deadline (aioipfs's own default is an hour). CIDs are v1 with raw leaves and no
file metadata, so identical content gives an identical CID on every worker. Fetched archives are
extracted here with tarfile's ``data`` filter: entries that would land outside the destination,
absolute paths, device files and links pointing out are refused, never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.payload

from bacq.errors import IpfsUnavailable, StorageError
from bacq.log import get_logger

__all__ = ["DEFAULT_IPFS_API", "Storage", "preload", "safe_extract", "sanitize_tree"]

DEFAULT_IPFS_API = "/ip4/127.0.0.1/tcp/5001"
log = get_logger("bacq.storage")


def _api_errors() -> tuple[type[Exception], ...]:
    import aioipfs  # imported on first use: it takes a fifth of the CLI's start-up

    return (aioipfs.APIError, aioipfs.UnknownAPIError)


async def preload() -> None:
    """Import the IPFS client in a thread, e.g. while a job runs, so that ``connect`` is quick."""
    await asyncio.to_thread(_api_errors)


class Storage:
    """A kubo node. Build it with ``await Storage.connect(maddr)`` inside a running loop."""

    def __init__(self, client: Any, maddr: str, timeout: float) -> None:
        self._client = client
        self.maddr = maddr
        self.timeout = timeout

    @classmethod
    async def connect(cls, maddr: str, *, timeout: float = 60.0) -> Storage:
        import aioipfs

        try:
            client = aioipfs.AsyncIPFS(maddr=maddr)
        except Exception as exc:  # aioipfs raises a bare Exception for a bad multiaddr
            raise IpfsUnavailable(
                f"BACQ_IPFS_API {maddr!r} is not a kubo RPC multiaddr ({exc}); "
                "write it like /ip4/127.0.0.1/tcp/5001"
            ) from None
        storage = cls(client, maddr, timeout)
        unreachable: tuple[type[Exception], ...] = (TimeoutError, OSError, *_api_errors())
        try:
            async with asyncio.timeout(10):
                info = await client.core.id()
            if not isinstance(info, dict) or "ID" not in info:
                # aioipfs returns None instead of raising when the connection fails
                raise OSError("connection failed")
        except unreachable as exc:
            await storage.close()
            raise IpfsUnavailable(
                f"no kubo RPC API answers at {maddr} ({type(exc).__name__}); start one with "
                "`bacq devstack` or set BACQ_IPFS_API / --ipfs to a running node"
            ) from None
        except Exception as exc:  # aiohttp's client errors are not all OSErrors
            await storage.close()
            raise IpfsUnavailable(f"no kubo RPC API answers at {maddr} ({exc})") from None
        return storage

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()

    async def node_id(self) -> dict[str, Any]:
        async with asyncio.timeout(self.timeout):
            result: dict[str, Any] = await self._client.core.id()
            return result

    async def add(self, path: Path, *, pin: bool = True, only_hash: bool = False) -> str:
        """Add a file or a folder (recursively, dotfiles included) and return its CIDv1.
        With ``only_hash``, compute that CID without storing any block in kubo."""
        path = Path(path)
        if not path.exists():
            # aioipfs skips missing paths without a word; say it instead
            raise StorageError(f"cannot add {path}: no such file or directory")
        root_name = path.name
        root: str | None = None
        try:
            async with asyncio.timeout(self.timeout):
                async for entry in self._add_entries(path, pin and not only_hash, only_hash):
                    if entry.get("Name") == root_name:
                        root = entry["Hash"]
        except TimeoutError:
            raise StorageError(f"adding {path} to IPFS took longer than {self.timeout}s") from None
        except _api_errors() as exc:
            raise StorageError(f"adding {path} to IPFS failed: {_api_message(exc)}") from None
        if root is None:
            raise StorageError(f"kubo did not return a CID for {path}")
        return root

    async def _add_entries(
        self, path: Path, pin: bool, only_hash: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        # the multipart form is built here, not by aioipfs's add(): with aiohttp >= 3.12 its
        # payloads for a lone file fail, and a folder holding an empty file and a subfolder makes
        # kubo wait forever for the rest of the form
        params = {"cid-version": "1", "pin": "true" if pin else "false", "recursive": "true"}
        if only_hash:
            params["only-hash"] = "true"
        writer = await asyncio.to_thread(_add_form, path)
        async for entry in self._client.core.add_generic(writer, params=params):
            yield entry

    async def pin(self, cid: str) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                async for _ in self._client.pin.add(cid):
                    pass
        except TimeoutError:
            raise StorageError(f"pinning {cid} took longer than {self.timeout}s") from None
        except _api_errors() as exc:
            raise StorageError(f"pinning {cid} failed: {_api_message(exc)}") from None

    async def fetch(self, cid: str, target: Path, *, timeout: float | None = None) -> Path:
        """Materialise ``cid`` at ``target`` (a file or a folder), safely. Returns ``target``.

        ``target`` must not exist yet, or be an empty folder.
        """
        target = Path(target)
        if target.exists() and not (target.is_dir() and not any(target.iterdir())):
            raise StorageError(f"{target} already exists and is not empty; choose another path")
        target.parent.mkdir(parents=True, exist_ok=True)
        deadline = timeout if timeout is not None else self.timeout
        with tempfile.TemporaryDirectory(prefix=".bacq-fetch-", dir=target.parent) as tmp:
            archive = Path(tmp) / "archive.tar"
            try:
                async with asyncio.timeout(deadline):
                    await self._download_tar(cid, archive)
            except TimeoutError:
                raise StorageError(
                    f"could not fetch {cid} from IPFS within {deadline:g}s: no reachable node "
                    "has it (add it with `bacq ipfs add` on a node of this network)"
                ) from None
            staging = Path(tmp) / "out"
            staging.mkdir()
            await asyncio.to_thread(safe_extract, archive, staging)
            produced = staging / cid
            if not (produced.exists() or produced.is_symlink()):
                raise StorageError(f"the archive kubo returned for {cid} has no entry {cid}")
            if target.exists():
                target.rmdir()
            os.replace(produced, target)
        return target

    async def read_tail(self, path: str, *, limit: int = 64 * 1024) -> bytes:
        """The last ``limit`` bytes of the file at ``path`` (``CID/stdout``), for a quick look."""
        try:
            async with asyncio.timeout(self.timeout):
                stat_url = self._client.core.url("files/stat")
                async with self._client.session.post(
                    stat_url, params={"arg": f"/ipfs/{path}"}
                ) as response:
                    body = await response.text()
                    if response.status != 200:
                        raise StorageError(f"kubo cannot stat {path}: {_kubo_message(body)}")
                    size = int(json.loads(body).get("Size", 0))
                params = {"arg": path, "offset": str(max(0, size - limit)), "length": str(limit)}
                async with self._client.session.post(
                    self._client.core.url("cat"), params=params
                ) as response:
                    if response.status != 200:
                        raise StorageError(
                            f"kubo cannot read {path}: {_kubo_message(await response.text())}"
                        )
                    data: bytes = await response.read()
                    return data
        except StorageError:
            raise
        except TimeoutError:
            raise StorageError(f"reading {path} from IPFS took over {self.timeout:g}s") from None
        except Exception as exc:  # aiohttp errors: connection refused, reset, payload errors
            raise StorageError(f"reading {path} from {self.maddr} failed: {exc}") from None

    async def _download_tar(self, cid: str, archive: Path) -> None:
        url = self._client.core.url("get")
        params = {"arg": cid, "archive": "true"}
        try:
            async with self._client.session.post(url, params=params) as response:
                if response.status != 200:
                    body = await response.text()
                    raise StorageError(f"kubo refused to get {cid}: {_kubo_message(body)}")
                with archive.open("wb") as out:
                    async for chunk in response.content.iter_chunked(256 * 1024):
                        out.write(chunk)
        except StorageError:
            raise
        except TimeoutError:
            raise
        except Exception as exc:  # aiohttp errors: connection refused, reset, payload errors
            raise StorageError(f"fetching {cid} from {self.maddr} failed: {exc}") from None


def _add_form(root: Path) -> aiohttp.MultipartWriter:
    """The multipart form of kubo's add for ``root``: folders first, then their entries, sorted.

    File contents stream from async generators: aiohttp's own file payloads (>= 3.12) leave kubo
    waiting for the end of the form when it holds several files.
    """
    writer = aiohttp.MultipartWriter("form-data")

    def part(name: str, payload: aiohttp.payload.Payload) -> None:
        payload.set_content_disposition("form-data", name="file", filename=name)
        writer.append_payload(payload)

    def add_file(name: str, full: Path) -> None:
        if full.stat().st_size == 0:
            part(name, aiohttp.payload.BytesPayload(b"", content_type="application/octet-stream"))
        else:
            part(
                name,
                aiohttp.payload.AsyncIterablePayload(
                    _read_chunks(full), content_type="application/octet-stream"
                ),
            )

    if not root.is_dir():
        add_file(root.name, root)
        return writer
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        name = root.name if here == root else f"{root.name}/{here.relative_to(root).as_posix()}"
        part(name, aiohttp.payload.BytesPayload(b"", content_type="application/x-directory"))
        for filename in sorted(filenames):
            full = here / filename
            if full.is_file() and not full.is_symlink():
                add_file(f"{name}/{filename}", full)
    return writer


async def _read_chunks(path: Path, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
    with path.open("rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, size):
            yield chunk


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest``; refuse (StorageError) any entry that would escape it."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            tar.extractall(dest, filter="data")
    except tarfile.FilterError as exc:
        raise StorageError(
            f"refused an unsafe archive entry: {exc}; nothing outside {dest} was written"
        ) from None
    except tarfile.TarError as exc:
        raise StorageError(f"the archive is corrupt: {exc}") from None


def sanitize_tree(root: Path) -> list[str]:
    """Remove everything under ``root`` that is not a regular file or a folder; return their names.

    Run on a container's output before adding it to IPFS: a symlink written by the job could
    otherwise make the worker read a host file, and a FIFO would block the add forever.
    """
    removed: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in list(dirnames) + filenames:
            full = Path(dirpath) / name
            mode = full.lstat().st_mode
            if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                continue
            removed.append(str(full.relative_to(root)))
            if name in dirnames:
                dirnames.remove(name)
            full.unlink()
    return removed


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _api_message(exc: Exception) -> str:
    return str(getattr(exc, "message", None) or exc)


def _kubo_message(body: str) -> str:
    try:
        return str(json.loads(body).get("Message", body)).strip()
    except ValueError:
        return body.strip()[:200]
