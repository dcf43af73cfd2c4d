"""A worker's kept commitments on disk (``bacq.worker.kept``): written whole, read back while in
time, and whatever is expired, unreadable or not ours is removed, never trusted."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bacq.worker import kept


def _record(expires_in: float = 60.0) -> kept.Kept:
    return kept.Kept(
        cid="bafy-example", exit_code=0, nonce="n" * 32, expires_at=time.time() + expires_in
    )


def test_a_kept_result_is_read_back_until_forgotten(tmp_path: Path) -> None:
    kept.keep(tmp_path, "j-abc", _record())
    assert kept.load_all(tmp_path) == {"j-abc": kept.load_all(tmp_path)["j-abc"]}
    assert kept.load_all(tmp_path)["j-abc"].nonce == "n" * 32
    kept.forget(tmp_path, "j-abc")
    kept.forget(tmp_path, "j-abc")  # (twice is fine)
    assert kept.load_all(tmp_path) == {}


def test_expired_garbled_and_foreign_files_are_removed(tmp_path: Path) -> None:
    kept.keep(tmp_path, "j-old", _record(expires_in=-1))
    kept.keep(tmp_path, "j-good", _record())
    where = tmp_path / "kept"
    (where / "j-garbled.json").write_text("{not json")
    (where / "j-wrong.json").write_text(json.dumps({"cid": 1, "exit_code": "x"}))
    (where / "j-extra.json").write_text(json.dumps({**_record().__dict__, "job_dir": "/"}))
    (where / "..hidden.json").write_text(json.dumps(_record().__dict__))
    (where / "notes.txt").write_text("hello")
    (where / "j-huge.json").write_text(" " * (kept.MAX_FILE + 1))
    assert set(kept.load_all(tmp_path)) == {"j-good"}
    assert sorted(p.name for p in where.iterdir()) == ["j-good.json"]


def test_no_kept_directory_is_no_kept_result(tmp_path: Path) -> None:
    assert kept.load_all(tmp_path / "absent") == {}
