"""A worker's kept commitments on disk (``bacq.worker.kept``): a journal of appended lines, read
back while in time, written again with the live ones only, and whatever is expired, garbled, cut
short or not ours is skipped, never trusted."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bacq.worker import kept


def _record(expires_in: float = 60.0, nonce: str = "n" * 32) -> kept.Kept:
    return kept.Kept(
        cid="bafy-example", exit_code=0, nonce=nonce, expires_at=time.time() + expires_in
    )


def test_a_kept_result_is_read_back_by_the_next_process_until_forgotten(tmp_path: Path) -> None:
    journal = kept.Journal(tmp_path)
    journal.keep("j-abc", _record())
    journal.keep("j-def", _record(nonce="d" * 32))
    journal.keep("j-abc", _record(nonce="a" * 32))  # (replaced)
    journal.close()
    again = kept.Journal(tmp_path)  # a worker started again
    loaded = again.load_all()
    assert sorted(loaded) == ["j-abc", "j-def"]
    assert loaded["j-abc"].nonce == "a" * 32
    again.forget("j-abc")
    again.forget("j-abc")  # (twice is fine)
    again.forget("j-never")
    again.close()
    assert set(kept.Journal(tmp_path).load_all()) == {"j-def"}
    # written again at load with the live ones only
    lines = (tmp_path / "kept" / kept.JOURNAL).read_text().splitlines()
    assert [json.loads(line)["job"] for line in lines] == ["j-def"]


def test_expired_garbled_cut_short_and_foreign_lines_are_skipped(tmp_path: Path) -> None:
    journal = kept.Journal(tmp_path)
    journal.keep("j-old", _record(expires_in=-1))
    journal.keep("j-good", _record())
    journal.close()
    good = {"job": "j-x", **_record().__dict__}
    with (tmp_path / "kept" / kept.JOURNAL).open("a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"job": "j-wrong", "cid": 1, "exit_code": "x"}) + "\n")
        f.write(json.dumps({**good, "job": "j-extra", "job_dir": "/"}) + "\n")
        f.write(json.dumps({**good, "job": "../escape"}) + "\n")
        f.write(json.dumps({**good, "job": "j-huge", "cid": "b" * kept.MAX_LINE}) + "\n")
        f.write(json.dumps([1, 2]) + "\n")
        f.write(json.dumps(good)[:40])  # a crash in the middle of a line
    assert set(kept.Journal(tmp_path).load_all()) == {"j-good"}


def test_files_of_the_layout_before_the_journal_are_read_then_removed(tmp_path: Path) -> None:
    where = tmp_path / "kept"
    where.mkdir()
    (where / "j-legacy.json").write_text(json.dumps(_record().__dict__))
    (where / "j-garbled.json").write_text("{not json")
    (where / "..hidden.json").write_text(json.dumps(_record().__dict__))
    assert set(kept.Journal(tmp_path).load_all()) == {"j-legacy"}
    assert sorted(p.name for p in where.iterdir()) == [kept.JOURNAL]


def test_the_journal_is_written_again_once_forgotten_lines_pile_up(tmp_path: Path) -> None:
    journal = kept.Journal(tmp_path)
    journal.keep("j-stays", _record())
    for i in range(kept.COMPACT_AFTER):
        journal.keep(f"j-{i}", _record())
        journal.forget(f"j-{i}")
    journal.close()
    lines = (tmp_path / "kept" / kept.JOURNAL).read_text().splitlines()
    assert len(lines) <= kept.COMPACT_AFTER + 1  # not 2 x COMPACT_AFTER + 1
    assert set(kept.Journal(tmp_path).load_all()) == {"j-stays"}


def test_no_kept_directory_is_no_kept_result(tmp_path: Path) -> None:
    assert kept.Journal(tmp_path / "absent").load_all() == {}
