"""Signed job histories: the requester's key, seal with a signer, and verify_history.

Mostly pure logic (and a temporary key file): histories are built the way the requester commits
them (``diff`` then ``seal``), then attacked the way an insider with write access to the events
stream could: removing events from the end, reordering them, forging events with a valid hash chain
(unsigned, signed by another key, or naming the requester's key), and rotating keys. The last test
runs ``bacq history --verify`` on a real devstack with the published and the pinned key.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bacq import subjects
from bacq.client import Client
from bacq.devstack import Devstack
from bacq.errors import ConfigError
from bacq.events import Event, decode_events, diff, encode_events, seal, verify_chain
from bacq.events import verify_history as verify
from bacq.models import Execution, JobRecord, new_job_id
from bacq.signing import (
    REQUESTER_KEY_ENV,
    PublishedKeys,
    Signer,
    fetch_requester_keys,
    load_signer,
    parse_public_keys,
    publish_requester_keys,
    signature_valid,
)
from bacq.spec import JobSpec
from bacq.states import ExecState, JobState
from tests.conftest import run_cli
from tests.scenarios import BUSYBOX

DEVSTACK = {"workers": 1}

REQUESTER = Signer.generate()
ATTACKER = Signer.generate()


def _exec(job: JobRecord, node: str, state: ExecState, **fields: object) -> None:
    job.executions[node] = Execution.model_validate({"node_id": node, "state": state, **fields})


def _job_state(state: JobState, **fields: object) -> Callable[[JobRecord], None]:
    def change(job: JobRecord) -> None:
        job.state = state
        for name, value in fields.items():
            setattr(job, name, value)

    return change


# one job's life, one commit per change, as the requester makes it
STEPS: list[tuple[str, Callable[[JobRecord], None]]] = [
    ("requester", _job_state(JobState.BIDDING)),
    ("requester", lambda job: _exec(job, "w1", ExecState.BID)),
    ("requester", lambda job: _exec(job, "w1", ExecState.ACCEPTED)),
    ("requester", _job_state(JobState.RUNNING)),
    ("w1", lambda job: _exec(job, "w1", ExecState.RUNNING)),
    ("w1", lambda job: _exec(job, "w1", ExecState.COMPLETED, exit_code=0, result_cid="bafyres")),
    ("verifier", lambda job: _exec(job, "w1", ExecState.VERIFIED, exit_code=0)),
    ("verifier", _job_state(JobState.ACCEPTED, result_cid="bafyres", exit_code=0)),
]


def history(
    signers: list[Signer | None] | Signer | None = REQUESTER,
) -> tuple[list[Event], JobRecord]:
    """A finished job's events (in stream order) and its record. ``signers``: one signer for
    every commit, or one per commit (the first is the submission)."""
    per_commit = signers if isinstance(signers, list) else [signers] * (len(STEPS) + 1)
    job = JobRecord(id=new_job_id(), spec=JobSpec(image="bacq-test/busybox", command=["true"]))
    stream: list[Event] = []

    def commit(before: JobRecord | None, actor: str, signer: Signer | None) -> None:
        new = diff(before, job, actor=actor)
        seal(new, job.last_hash, signer)
        job.event_seq, job.last_hash = new[-1].seq, new[-1].hash
        # as stored: one message per commit, decoded again
        stream.extend(decode_events(encode_events(new)))

    commit(None, "client", per_commit[0])
    for (actor, change), signer in zip(STEPS, per_commit[1:], strict=True):
        before = job.model_copy(deep=True)
        change(job)
        commit(before, actor, signer)
    return stream, job


def reseal(events: list[Event], start: int, signer: Signer | None) -> list[Event]:
    """What a forger with stream access does after editing event ``start``: recompute the
    chain from there on (so that it holds), signing with whatever key they have."""
    events = [e.model_copy(deep=True) for e in events]
    prev = events[start - 2].hash if start > 1 else events[0].prev_hash
    seal(events[start - 1 :], prev, signer)
    return events


def problems(events: list[Event], record: JobRecord, *keys: str) -> str:
    check = verify(events, record, list(keys) or [REQUESTER.key_id])
    assert not check.ok
    return "\n".join(check.problems)


# -- what verifies --------------------------------------------------------------------------------
def test_a_history_signed_by_the_requester_verifies_and_names_its_key() -> None:
    events, record = history()
    check = verify(events, record, [REQUESTER.key_id])
    assert check.ok, check.problems
    assert check.signers == [REQUESTER.key_id]
    assert check.anchor == record.event_seq == len(events)
    assert REQUESTER.key_id in check.summary()
    assert verify_chain(events) is None  # the chain check alone still holds


def _one_commit_history() -> tuple[list[Event], JobRecord]:
    """A job whose whole life after submission is one commit of several events."""
    job = JobRecord(id=new_job_id(), spec=JobSpec(image="bacq-test/busybox", command=["true"]))
    first = seal(diff(None, job, actor="client"), job.last_hash, REQUESTER)
    job.event_seq, job.last_hash = first[-1].seq, first[-1].hash
    before = job.model_copy(deep=True)
    for _, change in STEPS:
        change(job)
    rest = seal(diff(before, job, actor="requester"), job.last_hash, REQUESTER)
    job.event_seq, job.last_hash = rest[-1].seq, rest[-1].hash
    return first + rest, job


def test_one_signature_vouches_for_its_whole_commit() -> None:
    events, record = _one_commit_history()
    assert len(events) >= 3  # the submission, then one commit of two events or more
    assert all(e.key == REQUESTER.key_id for e in events)
    assert [e.sig is not None for e in events[1:]] == [False] * (len(events) - 2) + [True]
    check = verify(events, record, [REQUESTER.key_id])
    assert check.ok, check.problems
    assert check.unsigned == 0


def test_an_event_altered_inside_a_commit_fails_the_commits_signature() -> None:
    events, record = _one_commit_history()
    edited = [e.model_copy(deep=True) for e in events]
    edited[1].actor = "w9"  # inside the second commit: recompute the chain, keep the signature
    for i in range(1, len(edited)):
        edited[i].prev_hash = edited[i - 1].hash
        edited[i].hash = edited[i].digest()
    text = problems(edited, record)
    assert f"events 2-{len(events)}: the signature does not match the event" in text


def test_events_that_name_the_key_but_no_signature_follows_are_not_signed() -> None:
    events, record = _one_commit_history()
    extra = Event(
        job_id=record.id,
        seq=len(events) + 1,
        at=events[-1].at,
        kind="job",
        actor="requester",
        state="failed",
        reason="appended",
    )
    extra.prev_hash = events[-1].hash
    extra.key = REQUESTER.key_id
    extra.hash = extra.digest()
    text = problems([*events, extra], record)
    assert f"event {len(events) + 1} not signed" in text


def test_a_record_that_lags_its_history_still_verifies() -> None:
    # the requester publishes a commit's events before it saves the record: a reader may see both
    events, record = history()
    lagging = record.model_copy(update={"event_seq": 5, "last_hash": events[4].hash})
    check = verify(events, lagging, [REQUESTER.key_id])
    assert check.ok, check.problems
    assert check.newer == len(events) - 5


def test_events_from_before_signing_keep_their_hash() -> None:
    # an event stored before events had a key and a signature: no such fields in its JSON
    events, record = history(signers=None)
    stored = [json.loads(e.model_dump_json(exclude={"key", "sig"})) for e in events]
    old = [Event.model_validate(data) for data in stored]
    assert verify_chain(old) is None
    check = verify(old, record, [], require_signatures=False)
    assert check.ok, check.problems
    assert check.unsigned == len(old)
    assert "NOT signed" in check.summary()


# -- truncation -----------------------------------------------------------------------------------
def test_events_removed_from_the_end_are_reported_as_truncation() -> None:
    events, record = history()
    last = record.event_seq
    text = problems(events[:-2], record)
    assert f"the job record's last event is {last}" in text
    assert f"events {last - 1}-{last} removed from the end (truncated)" in text


def test_an_emptied_history_is_reported() -> None:
    _, record = history()
    assert "the history is empty" in problems([], record)


def test_a_removed_event_in_the_middle_is_reported_missing() -> None:
    events, record = history()
    assert "event 3 missing" in problems(events[:2] + events[3:], record)


# -- reordering -----------------------------------------------------------------------------------
def test_events_stored_out_of_order_are_reported_as_reordered() -> None:
    events, record = history()
    swapped = [*events[:3], events[4], events[3], *events[5:]]
    assert "event 4 stored after later ones: the history was reordered" in problems(swapped, record)


def test_events_renumbered_into_another_order_are_forged() -> None:
    # a forger who swaps what two events say (and so their order) must recompute the chain,
    # and cannot sign it with the requester's key
    events, record = history()
    edited = [e.model_copy(deep=True) for e in events]
    for field in ("state", "kind", "node_id", "actor", "reason"):
        a, b = getattr(edited[4], field), getattr(edited[5], field)
        setattr(edited[4], field, b)
        setattr(edited[5], field, a)
    for forger in (ATTACKER, None):
        text = problems(reseal(edited, 5, forger), record)
        assert "event 9 is not the one the job record names" in text
        if forger is ATTACKER:
            assert f"events 5-9 signed by {ATTACKER.key_id}" in text
        else:
            assert "events 5-9 not signed" in text


# -- forged events --------------------------------------------------------------------------------
def test_a_forged_event_with_recomputed_hashes_signed_by_another_key_is_reported() -> None:
    events, record = history()
    edited = [e.model_copy(deep=True) for e in events]
    edited[6].result_cid = "bafyforged"  # event 7: w1's result
    forged = reseal(edited, 7, ATTACKER)
    assert verify_chain(forged) is None  # the hash chain alone is fine
    text = problems(forged, record)
    assert f"events 7-9 signed by {ATTACKER.key_id}, which is not a trusted requester key" in text
    # and the last event is no longer the record's
    assert "event 9 is not the one the job record names" in text


def test_a_forged_event_that_names_the_requester_key_fails_its_signature() -> None:
    events, record = history()
    edited = [e.model_copy(deep=True) for e in events]
    edited[6].result_cid = "bafyforged"
    forged = reseal(edited, 7, ATTACKER)
    for event in forged[6:]:  # claim the requester's key: the hash changes, the signature fails
        event.key = REQUESTER.key_id
        event.hash = event.digest()
        event.sig = ATTACKER.sign_hash(event.hash)
    for i in range(7, len(forged)):
        forged[i].prev_hash = forged[i - 1].hash
    text = problems(forged, record)
    assert "the signature does not match the event: forged or altered" in text


def test_a_signature_copied_onto_an_altered_event_does_not_verify() -> None:
    events, record = history()
    forged = [e.model_copy(deep=True) for e in events]
    forged[3].actor = "w9"  # keep hash and signature: content no longer matches
    assert "event 4 was altered: its content does not match its hash" in problems(forged, record)
    forged[3].hash = forged[3].digest()  # recompute the hash: the signature no longer matches
    text = problems(forged, record)
    assert "event 4: the signature does not match" in text
    assert "event 5 does not follow event 4" in text


def test_an_unsigned_event_appended_after_signed_ones_is_reported_even_unpinned() -> None:
    events, record = history()
    extra = Event(job_id=record.id, seq=record.event_seq + 1, actor="verifier", kind="job",
                  state="accepted", result_cid="bafyforged")  # fmt: skip
    seal([extra], events[-1].hash)
    check = verify([*events, extra], record, [], require_signatures=False)
    assert any("not signed, though earlier events are" in p for p in check.problems)


def test_an_event_appended_by_another_key_is_reported() -> None:
    events, record = history()
    extra = Event(job_id=record.id, seq=record.event_seq + 1, actor="verifier", kind="job",
                  state="accepted", result_cid="bafyforged")  # fmt: skip
    seal([extra], events[-1].hash, ATTACKER)
    text = problems([*events, extra], record)
    assert f"event {extra.seq} signed by {ATTACKER.key_id}" in text


def test_an_unsigned_history_is_reported_when_a_key_is_trusted() -> None:
    events, record = history(signers=None)
    assert f"events 1-{len(events)} not signed" in problems(events, record)


def test_signed_events_without_any_trusted_key_do_not_verify() -> None:
    events, record = history()
    check = verify(events, record, [], require_signatures=False)
    assert "(trusted: none is known)" in "\n".join(check.problems)


def test_another_jobs_events_spliced_in_are_reported() -> None:
    events, record = history()
    other, _ = history()
    text = problems(events[:-1] + other[-1:], record)
    assert "belong to another job" in text


# -- key rotation ---------------------------------------------------------------------------------
def test_a_rotated_key_verifies_while_the_old_one_is_listed() -> None:
    new = Signer.generate()
    signers: list[Signer | None] = [*[REQUESTER] * 4, *[new] * (len(STEPS) - 3)]
    events, record = history(signers)
    both = verify(events, record, [new.key_id, REQUESTER.key_id])
    assert both.ok, both.problems
    assert both.signers == [REQUESTER.key_id, new.key_id]
    old_retired = problems(events, record, new.key_id)
    assert f"signed by {REQUESTER.key_id}, which is not a trusted requester key" in old_retired


# -- the key file and the published keys ----------------------------------------------------------
def test_the_requester_creates_its_key_file_private_and_reloads_the_same_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state" / "signing.nk"
    first = load_signer(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signer(path).key_id == first.key_id
    assert first.key_id.startswith("N")
    assert first.key_id in repr(first)
    assert first.seed.decode() not in repr(first)


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signing.nk"
    load_signer(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_signer(path)


def test_a_key_file_that_is_not_a_seed_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signing.nk"
    path.write_text("not a seed\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="not an nkey seed"):
        load_signer(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_signer(tmp_path / "missing.nk", create=False)


def test_pinned_keys_are_checked() -> None:
    assert parse_public_keys(f"{REQUESTER.key_id}, {ATTACKER.key_id}") == [
        REQUESTER.key_id,
        ATTACKER.key_id,
    ]
    broken = REQUESTER.key_id[:-1] + ("A" if REQUESTER.key_id[-1] != "A" else "B")
    with pytest.raises(ConfigError, match=r"BACQ_REQUESTER_KEY: .* is not an nkey public key"):
        parse_public_keys(broken)
    with pytest.raises(ConfigError, match="is not an nkey public key"):
        parse_public_keys(REQUESTER.seed.decode())  # a seed is no public key
    with pytest.raises(ConfigError, match="empty"):
        parse_public_keys(" , ")


def test_signatures_only_verify_for_their_key_and_hash() -> None:
    sig = REQUESTER.sign_hash("ab" * 32)
    assert signature_valid(REQUESTER.key_id, "ab" * 32, sig)
    assert not signature_valid(REQUESTER.key_id, "cd" * 32, sig)
    assert not signature_valid(ATTACKER.key_id, "ab" * 32, sig)
    assert not signature_valid(REQUESTER.key_id, "ab" * 32, "not base64!")
    assert not signature_valid("Nnotakey", "ab" * 32, sig)


def test_published_keys_must_list_their_current_key() -> None:
    good = PublishedKeys(current=REQUESTER.key_id, keys=[REQUESTER.key_id, ATTACKER.key_id])
    assert PublishedKeys.decode(good.encode()).keys == good.keys
    with pytest.raises(ConfigError, match="not in 'keys'"):
        PublishedKeys.decode(
            json.dumps({"current": ATTACKER.key_id, "keys": [REQUESTER.key_id]}).encode()
        )
    with pytest.raises(ConfigError, match="not a key list"):
        PublishedKeys.decode(b"[]")
    with pytest.raises(ConfigError, match="bytes, more than"):
        PublishedKeys.decode(b" " * 20000)


# -- bacq history --verify on a real devstack -----------------------------------------------------
async def test_history_verify_uses_the_published_or_pinned_key_and_reports_attacks(
    stack: Devstack,
) -> None:
    # the attacks write where only the requester may (bacq-keys, the events, the job record):
    # an insider holding the requester's NATS user
    insider_options = stack.nats_options("requester")
    async with (
        await Client.connect(stack.nats.url, options=stack.client_options()) as client,
        await Client.connect(stack.nats.url, options=insider_options) as insider,
    ):
        job_id = await client.submit({"image": BUSYBOX, "command": ["true"]})
        await client.wait(job_id, timeout=60)
        # the devstack's requester signed every event with its key and published it
        real = await fetch_requester_keys(client.bus.js)
        assert real is not None
        done = run_cli(stack, "history", job_id, "--verify")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"signed by {real.current}" in done.stdout
        # pinned to another key: the requester's signatures are not trusted
        done = run_cli(stack, "history", job_id, "--verify", "--requester-key", ATTACKER.key_id)
        assert done.returncode == 1
        assert "which is not a trusted requester key" in done.stdout

        # a history rewritten and signed with another listed requester key (a rotation)
        published = await publish_requester_keys(insider.bus.js, REQUESTER)
        assert {real.current, REQUESTER.key_id} <= set(published.keys)
        assert await fetch_requester_keys(client.bus.js) == published
        subject = subjects.events(job_id)
        record = await client.job(job_id)

        async def rewrite(events: list[Event], last: Event) -> None:
            await insider.bus.js.purge_stream(subjects.EVENTS_STREAM, subject=subject)
            for event in events:  # one message per event, as plain publishes (no dedup id)
                await insider.bus.js.publish(subject, encode_events([event]))
            record.event_seq, record.last_hash = last.seq, last.hash
            await insider.bus.save_job(record)

        signed = reseal(await client.history(job_id), 1, REQUESTER)
        await rewrite(signed, signed[-1])
        done = run_cli(stack, "history", job_id, "--verify")
        assert done.returncode == 0, done.stdout
        assert f"published by the requester in bucket {subjects.KEYS_BUCKET}" in done.stdout
        assert f"signed by {REQUESTER.key_id}" in done.stdout

        # truncated: the last event removed from the stream
        await rewrite(signed[:-1], signed[-1])
        done = run_cli(stack, "history", job_id, "--verify")
        assert done.returncode == 1
        assert "removed from the end (truncated)" in done.stdout

        # forged: a result changed and the chain recomputed with another key; even when the forger
        # also rewrites the job record to point at its last event
        edited = [e.model_copy(deep=True) for e in signed]
        edited[-1].result_cid = "bafyforged"
        forged = reseal(edited, len(edited), ATTACKER)
        await rewrite(forged, forged[-1])
        done = run_cli(stack, "history", job_id, "--verify")
        assert done.returncode == 1
        assert f"signed by {ATTACKER.key_id}, which is not a trusted requester key" in done.stdout

        # whoever can write bacq-keys can add a key there; a pin wins over what is published
        await publish_requester_keys(insider.bus.js, ATTACKER)
        done = run_cli(stack, "history", job_id, "--verify")
        assert done.returncode == 0, done.stdout  # the published keys now list the forger's
        env_pin = {**os.environ, REQUESTER_KEY_ENV: REQUESTER.key_id}
        done = run_cli_env(stack, env_pin, "history", job_id, "--verify")
        assert done.returncode == 1
        assert f"trusted key {REQUESTER.key_id} (pinned by {REQUESTER_KEY_ENV})" in done.stdout
        # (the forger's one signature now vouches for the whole chain before it)
        assert f"{forged[-1].seq} signed by {ATTACKER.key_id}" in done.stdout


def run_cli_env(
    stack: Devstack, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return run_cli(stack, *args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
