"""A worker's work directory (``bacq.worker.workdir``): one worker holds it at a time, the lock
goes with its holder, and a starting worker removes the job folders a killed one left, but those
of the results it still keeps for the verifier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bacq.errors import ConfigError
from bacq.worker import workdir


def test_a_second_worker_on_the_same_work_dir_is_refused_with_the_fix(tmp_path: Path) -> None:
    work = tmp_path / "work"
    with workdir.claimed(work):
        assert (work / workdir.LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(ConfigError) as refused, workdir.claimed(work):
            pass
        message = str(refused.value)
        assert str(work) in message
        assert f"pid {os.getpid()}" in message
        assert "give each worker its own --work-dir" in message
    with workdir.claimed(work):  # released with its holder: the next worker takes it
        pass


def test_the_lock_of_a_killed_worker_is_gone_with_it(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from bacq.worker import workdir\n"
            f"with workdir.claimed(Path({str(tmp_path)!r})):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"), workdir.claimed(tmp_path):
            pass
    finally:
        holder.kill()
        holder.communicate()  # (closes its pipe)
    with workdir.claimed(tmp_path):  # (no stale lock: the kernel released it)
        pass


def test_leftover_job_folders_go_but_those_of_kept_results(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    for name in ("j-kept", "j-killed", "j-other"):
        (jobs / name / "results").mkdir(parents=True)
        (jobs / name / "results" / "out.txt").write_text(name)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("not the worker's")
    (jobs / "j-link").symlink_to(outside)
    (jobs / "stray-file").write_text("x")
    removed = workdir.remove_leftover_jobs(tmp_path, {"j-kept"})
    assert removed == ["j-killed", "j-link", "j-other", "stray-file"]
    assert sorted(p.name for p in jobs.iterdir()) == ["j-kept"]
    assert (jobs / "j-kept" / "results" / "out.txt").read_text() == "j-kept"
    assert (outside / "precious").exists()  # a link is removed, never followed
    assert workdir.remove_leftover_jobs(tmp_path / "never-used", set()) == []
