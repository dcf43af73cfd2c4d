"""Results a worker committed to and keeps until the verifier asks for them, also on disk, so that
a worker killed and started again between its commitment and the reveal request can still reveal
(before: it answered "no result kept" and the job failed for want of a verdict). Touches
``<work_dir>/kept/`` only: one small JSON file per job, written whole (a temporary file renamed).

The nonce in it proves the commitment; it stays on the worker's own disk, as the result does.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bacq import subjects

__all__ = ["Kept", "forget", "keep", "load_all"]

MAX_FILE = 4096  # bytes of one kept record (a larger file is not ours)


@dataclass(frozen=True)
class Kept:
    """What the worker needs to reveal a committed result after a restart."""

    cid: str
    exit_code: int
    nonce: str
    expires_at: float  # wall-clock seconds (time.time()) when it is dropped unrevealed
    published: bool = False


def _dir(work_dir: Path) -> Path:
    return work_dir / "kept"


def keep(work_dir: Path, job_id: str, kept: Kept) -> None:
    """Write ``job_id``'s kept record (replacing any)."""
    where = _dir(work_dir)
    where.mkdir(parents=True, exist_ok=True)
    partial = where / f".{job_id}.tmp"
    partial.write_text(json.dumps(asdict(kept)))
    os.replace(partial, where / f"{job_id}.json")


def forget(work_dir: Path, job_id: str) -> None:
    """Remove ``job_id``'s kept record (revealed, dropped or expired)."""
    with contextlib.suppress(FileNotFoundError):
        (_dir(work_dir) / f"{job_id}.json").unlink()


def load_all(work_dir: Path) -> dict[str, Kept]:
    """Every kept record still in time, by job id; expired, unreadable or foreign files are
    removed."""
    where = _dir(work_dir)
    if not where.is_dir():
        return {}
    found: dict[str, Kept] = {}
    for path in where.iterdir():
        job_id = path.name.removesuffix(".json")
        try:
            if (
                path.suffix != ".json"
                or not subjects.is_token(job_id)
                or path.stat().st_size > MAX_FILE
            ):
                raise ValueError("not a kept record")
            kept = Kept(**json.loads(path.read_text()))
            if not (
                isinstance(kept.cid, str)
                and isinstance(kept.nonce, str)
                and isinstance(kept.exit_code, int)
                and isinstance(kept.expires_at, (int, float))
            ):
                raise ValueError("a field of the wrong type")
            if kept.expires_at < time.time():
                raise ValueError("expired")
        except (OSError, ValueError, TypeError):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        found[job_id] = kept
    return found
