"""A worker's work directory: one worker at a time, and what a killed worker left in it. Touches
``<work_dir>/worker.lock`` and the job folders under ``<work_dir>/jobs/``.

Two workers on one work directory (two ``bacq worker`` started without ``--work-dir`` by the same
user) would remove each other's containers and job folders as leftovers, and read each other's
kept results. The second one is refused, with a message naming the directory and the first
worker's pid. Holding the lock, a worker that starts knows that every job folder it finds is a
killed predecessor's: those of the results it keeps for the verifier (``bacq.worker.kept``) stay,
the others are removed (before, they stayed for good).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Collection, Iterator
from pathlib import Path

from bacq.errors import ConfigError
from bacq.unixfs import remove_tree

__all__ = ["claimed", "remove_leftover_jobs"]

LOCK_FILE = "worker.lock"


@contextlib.contextmanager
def claimed(work_dir: Path) -> Iterator[None]:
    """Hold ``work_dir`` for this worker (created if missing); ``ConfigError`` when another
    worker holds it. The lock is the kernel's (``flock``): it goes with the process, however it
    ends, so a killed worker never leaves a stale one."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(work_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(
                f"work dir {work_dir} is in use by another worker (pid {holder[:20]}): give each "
                "worker its own --work-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def remove_leftover_jobs(work_dir: Path, keep: Collection[str]) -> list[str]:
    """Remove the job folders under ``<work_dir>/jobs`` but those named in ``keep``; their names.
    Only for a worker that holds ``work_dir`` (``claimed``) and runs no job yet."""
    try:
        entries = sorted((work_dir / "jobs").iterdir())
    except FileNotFoundError:
        return []
    removed: list[str] = []
    for entry in entries:
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            remove_tree(entry)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry.name)
    return removed
