"""The declaration table of streams and buckets (bacq.streams): complete, and one replicas setting
for all of them. tests/test_nats_cluster.py checks the three copies on a real cluster."""

from __future__ import annotations

import pytest

from bacq import streams, subjects
from bacq.errors import ConfigError


def test_every_stream_and_bucket_bacq_names_is_in_the_table() -> None:
    assert set(streams.STREAMS) == {
        subjects.STREAM,
        subjects.VERDICTS_STREAM,
        subjects.DEAD_STREAM,
        subjects.EVENTS_STREAM,
        subjects.LOGS_STREAM,
    }
    assert set(streams.BUCKETS) == {
        subjects.JOBS_BUCKET,
        subjects.RESULTS_BUCKET,
        subjects.IDEMPOTENCY_BUCKET,
        subjects.NODES_BUCKET,
        subjects.REPUTATION_BUCKET,
        subjects.ANSWERS_BUCKET,
        subjects.LEASES_BUCKET,
        subjects.KEYS_BUCKET,
    }


def test_bacq_js_replicas_applies_to_every_stream_and_bucket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(streams.REPLICAS_ENV, "3")
    assert {streams.stream_config(n).num_replicas for n in streams.STREAMS} == {3}
    assert {streams.bucket_config(n).replicas for n in streams.BUCKETS} == {3}
    monkeypatch.setenv(streams.REPLICAS_ENV, "seven")
    with pytest.raises(ConfigError, match="BACQ_JS_REPLICAS must be a number from 1 to 5"):
        streams.stream_config(subjects.LOGS_STREAM)


def test_an_undeclared_name_is_refused() -> None:
    with pytest.raises(ValueError, match="not a bucket"):
        streams.bucket_config("bacq-nothing")
    with pytest.raises(ValueError, match="not a stream"):
        streams.stream_config("NOTHING")
