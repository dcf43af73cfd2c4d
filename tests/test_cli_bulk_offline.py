"""Files of many jobs and the CLI's shared argument handling, without a network: the three
formats, problems named by job index and line, nothing submitted from a bad file, batches split by
count and by bytes, one --since, the --wait/--no-wait pair, --ipfs-timeout."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import yaml

from bacq import submission
from bacq.cli import build_parser
from bacq.commands.common import DEFAULT_IPFS_API, DEFAULT_NATS_URL, UsageError, parse_since
from bacq.jobfile import JobFileError, parse_jobs_text
from tests.test_cli_offline import cli

BUSYBOX = "bacq-test/busybox"


# -- the three formats -------------------------------------------------------------------------
def _many(count: int) -> list[dict[str, object]]:
    return [{"image": BUSYBOX, "command": ["echo", str(i)]} for i in range(count)]


@pytest.mark.parametrize("form", ["yaml_list", "yaml_documents", "json_lines", "json_list"])
def test_a_file_of_many_jobs_reads_in_every_format_in_file_order(form: str) -> None:
    jobs = _many(5)
    text = {
        "yaml_list": yaml.safe_dump(jobs),
        "yaml_documents": yaml.safe_dump_all(jobs),
        "json_lines": "\n".join(json.dumps(j) for j in jobs) + "\n",
        "json_list": json.dumps(jobs, indent=1),
    }[form]
    found = parse_jobs_text(text, "jobs")
    assert found.many
    assert not found.problems
    assert [s.command for _, s in found.valid] == [["echo", str(i)] for i in range(5)]


def test_a_file_of_one_job_is_still_one_job() -> None:
    for text in (f"image: {BUSYBOX}\n", json.dumps({"image": BUSYBOX}), f"---\nimage: {BUSYBOX}\n"):
        found = parse_jobs_text(text, "job")
        assert not found.many
        assert len(found.valid) == 1


def test_each_problem_names_the_job_index_and_its_line() -> None:
    text = (
        f"- image: {BUSYBOX}\n"  # job 0: fine
        f"- image: {BUSYBOX}\n"  # job 1
        "  concurrency: lots\n"  # line 3
        "- just a string\n"  # job 2, line 4
        f"- image: {BUSYBOX}\n"  # job 3
        "  comand: [echo]\n"  # line 6
    )
    found = parse_jobs_text(text, "jobs.yaml")
    assert [i for i, _ in found.valid] == [0]
    seen = {(p.index, p.line, p.field) for p in found.problems}
    assert (1, 3, "concurrency") in seen
    assert (2, 4, "job") in seen
    assert (3, 6, "comand") in seen
    unknown = next(p for p in found.problems if p.field == "comand")
    assert "did you mean `command`?" in unknown.message


def test_json_lines_problems_name_the_line_of_the_job() -> None:
    text = json.dumps({"image": BUSYBOX}) + "\n\n" + json.dumps({"image": BUSYBOX, "timeout": -1})
    (problem,) = parse_jobs_text(text, "jobs.jsonl").problems
    assert (problem.index, problem.line, problem.field) == (1, 3, "timeout")


def test_a_broken_json_line_is_a_problem_of_the_file_with_its_line() -> None:
    with pytest.raises(JobFileError) as caught:
        parse_jobs_text(json.dumps({"image": BUSYBOX}) + '\n{"image": \n', "jobs.jsonl")
    assert "line 2" in str(caught.value)


def test_an_empty_list_holds_no_jobs() -> None:
    with pytest.raises(JobFileError, match="holds no jobs"):
        parse_jobs_text("[]\n", "jobs")


def test_create_submits_nothing_from_a_file_with_a_bad_job_and_says_where() -> None:
    text = yaml.safe_dump([*_many(3), {"image": BUSYBOX, "timeout": "soon"}])
    line = text.splitlines().index("  timeout: soon") + 1
    done = cli("create", "-f", "-", stdin=text)
    assert done.returncode == 2, done.stderr
    assert "1 of its 4 jobs have problems; nothing was submitted" in done.stderr
    assert "--skip-invalid" in done.stderr
    assert f"<stdin>:{line}: job 3: timeout:" in done.stderr
    assert "NATS" not in done.stderr  # checked before any connection
    assert done.stdout == ""


def test_validate_counts_the_jobs_of_a_good_file_and_lists_their_specs() -> None:
    text = "\n".join(json.dumps(j) for j in _many(3))
    done = cli("validate", "-f", "-", stdin=text)
    assert done.returncode == 0, done.stderr
    assert "holds 3 jobs" in done.stdout
    report = json.loads(cli("validate", "-f", "-", "--output", "json", stdin=text).stdout)
    assert [s["command"] for s in report["specs"]] == [["echo", "0"], ["echo", "1"], ["echo", "2"]]


def test_create_dry_run_of_many_jobs_writes_documents_that_read_back() -> None:
    done = cli("create", "-f", "-", "--dry-run", stdin=yaml.safe_dump(_many(3)))
    assert done.returncode == 0, done.stderr
    again = parse_jobs_text(done.stdout, "dry")
    assert [s.command for _, s in again.valid] == [["echo", "0"], ["echo", "1"], ["echo", "2"]]


def test_skip_invalid_drops_only_the_bad_jobs_from_a_dry_run() -> None:
    text = yaml.safe_dump([*_many(2), {"image": ""}])
    done = cli("create", "-f", "-", "--dry-run", "--skip-invalid", stdin=text)
    assert done.returncode == 0, done.stderr
    assert "skipping 1 of 3 jobs" in done.stderr
    assert len(parse_jobs_text(done.stdout, "dry").valid) == 2


# -- batches -------------------------------------------------------------------------------------
def test_batches_keep_order_and_stay_under_the_count_and_the_bytes() -> None:
    sizes = [100] * 25
    runs = submission.batches(sizes, max_count=10, max_bytes=10_000)
    assert [len(r) for r in runs] == [10, 10, 5]
    runs = submission.batches(sizes, max_count=1000, max_bytes=505)
    assert all(sum(sizes[i] + 1 for i in r) <= 505 for r in runs)
    assert [i for r in runs for i in r] == list(range(25))
    # a spec larger than the limit goes alone
    assert submission.batches([10, 900, 10], max_count=10, max_bytes=100) == [
        range(0, 1),
        range(1, 2),
        range(2, 3),
    ]


# -- shared argument handling ----------------------------------------------------------------------
def test_since_reads_durations_and_local_times_the_same_for_every_command() -> None:
    at = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.UTC)
    assert parse_since("1w", at) == at - dt.timedelta(days=7)
    assert parse_since("1.5h", at) == at - dt.timedelta(minutes=90)
    zoneless = parse_since("2026-01-30T08:00")
    assert zoneless == dt.datetime(2026, 1, 30, 8, 0).astimezone()
    assert parse_since("2026-01-30T08:00Z") == dt.datetime(2026, 1, 30, 8, 0, tzinfo=dt.UTC)
    with pytest.raises(UsageError):
        parse_since("yesterday")
    for command in ("list", "events"):
        done = cli(command, "--since", "yesterday")
        assert done.returncode == 2, (command, done.stderr)
        assert "neither a duration" in done.stderr


def test_run_wait_and_no_wait_are_one_switch() -> None:
    parser = build_parser()
    assert parser.parse_args(["run", BUSYBOX]).wait is True
    assert parser.parse_args(["run", "--no-wait", BUSYBOX]).wait is False
    assert parser.parse_args(["run", "--no-wait", "--wait", BUSYBOX]).wait is True
    assert parser.parse_args(["create", "-f", "x"]).wait is False
    assert parser.parse_args(["create", "-f", "x", "--wait"]).wait is True


def test_ipfs_timeout_is_its_own_name_and_the_old_one_still_works(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser()
    assert parser.parse_args(["logs", "j-1"]).ipfs_timeout == 60.0
    assert parser.parse_args(["get", "j-1", "--ipfs-timeout", "9"]).ipfs_timeout == 9.0
    assert parser.parse_args(["run", "--timeout", "7", BUSYBOX]).timeout == 7.0  # the job's
    old = parser.parse_args(["get", "j-1", "--timeout", "5"])
    assert old.ipfs_timeout == 5.0
    assert "--ipfs-timeout" in capsys.readouterr().err


def test_the_cli_defaults_are_those_of_the_bus_and_storage() -> None:
    from bacq.bus import DEFAULT_NATS_URL as BUS_DEFAULT
    from bacq.commands.jobs import REQUESTER_KEY_ENV
    from bacq.signing import REQUESTER_KEY_ENV as SIGNING_ENV
    from bacq.storage import DEFAULT_IPFS_API as STORAGE_DEFAULT

    assert DEFAULT_NATS_URL == BUS_DEFAULT
    assert DEFAULT_IPFS_API == STORAGE_DEFAULT
    assert REQUESTER_KEY_ENV == SIGNING_ENV


def test_history_and_cancel_complete_job_ids() -> None:
    from bacq.commands.common import JOB_ID_COMPLETION

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    for command in ("describe", "logs", "get", "history", "cancel"):
        job_id = next(a for a in sub.choices[command]._actions if a.dest == "job_id")  # type: ignore[attr-defined]
        assert getattr(job_id, "complete", None) == JOB_ID_COMPLETION, command
