"""Prometheus metrics of the requester, the verifier and the workers, and their HTTP endpoint.

Touches a loopback (or chosen) TCP port when a service asks for it (``start``: the
``--metrics-port`` flag, or ``BACQ_METRICS_PORT``; ``BACQ_METRICS_ADDR`` picks the address,
127.0.0.1 by default). Only services import this module (prometheus-client is not loaded by the
CLI's client commands). Every metric is defined here, once; ``docs/metrics.md`` is generated from
these definitions (``python -m bacq.metrics``) and a test keeps it current.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bacq.errors import ConfigError

__all__ = [
    "ASSIGNMENTS",
    "BIDS",
    "EXECUTIONS_LOST",
    "EXECUTION_SECONDS",
    "JOBS",
    "JOBS_FINISHED",
    "METRICS",
    "QUEUE_DEPTH",
    "QUEUE_WAIT",
    "VERDICTS",
    "VERIFICATION_SECONDS",
    "observe",
    "start",
]

PORT_ENV = "BACQ_METRICS_PORT"
ADDR_ENV = "BACQ_METRICS_ADDR"

# every metric, as documented: (name as scraped, type, meaning, labels)
METRICS: list[tuple[str, str, str, tuple[str, ...]]] = []


def _counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
    METRICS.append((f"{name}_total", "counter", text, labels))
    return Counter(name, text, labels)


def _gauge(name: str, text: str, labels: tuple[str, ...] = ()) -> Gauge:
    METRICS.append((name, "gauge", text, labels))
    return Gauge(name, text, labels)


def _histogram(
    name: str, text: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
) -> Histogram:
    METRICS.append((name, "histogram", text, labels))
    return Histogram(name, text, labels, buckets=buckets)


# -- requester --------------------------------------------------------------------------------
JOBS = _gauge("bacq_jobs", "Unfinished jobs the requester holds, by state.", ("state",))
JOBS_FINISHED = _counter(
    "bacq_jobs_finished", "Jobs that reached a final state, by that state.", ("state",)
)
QUEUE_DEPTH = _gauge("bacq_queue_depth", "Jobs waiting in the requester's queue for a worker.")
QUEUE_WAIT = _histogram(
    "bacq_queue_wait_seconds",
    "From a job's submission to the start of its bidding.",
    (0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600),
)
BIDS = _counter("bacq_bids", "Bids received, by what became of them.", ("outcome",))
ASSIGNMENTS = _counter(
    "bacq_assignments", "Assignments sent to chosen workers, by their answer.", ("result",)
)
EXECUTIONS_LOST = _counter(
    "bacq_executions_lost",
    "Executions given up on (worker silent, restarted, declined or handed the job back), "
    "by whether another worker took the job over.",
    ("retried",),
)
# -- verifier (and the requester, which folds the verdicts) -------------------------------------
VERDICTS = _counter("bacq_verdicts", "Verdicts, by outcome.", ("outcome",))
VERIFICATION_SECONDS = _histogram(
    "bacq_verification_seconds",
    "Verifier: from a job's first answer (commitment or error) to its verdict.",
    (0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600),
)
# -- worker -----------------------------------------------------------------------------------
EXECUTION_SECONDS = _histogram(
    "bacq_execution_seconds",
    "Worker: from an assignment to its result (commitment or error), by outcome.",
    (0.01, 0.1, 0.5, 1, 5, 30, 120, 600, 3600),
    ("outcome",),
)

# metrics whose values live in the service objects (see ``observe``)
_OBSERVED = [
    ("bacq_nats_reconnects", "counter", "Reconnections to NATS since the process started.", ()),
    ("bacq_dead_letters", "counter", "Messages a consumer gave up on, by consumer.", ("consumer",)),
    (
        "bacq_node_offences",
        "counter",
        "Forged, malformed and similar messages counted against nodes, by kind.",
        ("kind",),
    ),
    ("bacq_worker_slots", "gauge", "Worker: job slots, by use (used, free).", ("use",)),
]
METRICS += [(n + ("_total" if t == "counter" else ""), t, h, lb) for n, t, h, lb in _OBSERVED]


class _Observed(Collector):
    """Reads counts the services keep themselves (so that bacq.bus, shared with the CLI, needs
    no prometheus-client): NATS reconnects, dead letters, offences, worker slots."""

    reconnects: Callable[[], int] | None = None
    dead_letters: Callable[[], dict[str, int]] | None = None
    offences: Callable[[], dict[str, int]] | None = None
    slots: Callable[[], tuple[int, int]] | None = None

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        docs = {name: text for name, _, text, _ in _OBSERVED}
        if self.reconnects is not None:
            yield CounterMetricFamily(
                "bacq_nats_reconnects", docs["bacq_nats_reconnects"], value=self.reconnects()
            )
        for name, read, label in (
            ("bacq_dead_letters", self.dead_letters, "consumer"),
            ("bacq_node_offences", self.offences, "kind"),
        ):
            if read is not None:
                family = CounterMetricFamily(name, docs[name], labels=[label])
                for key, value in sorted(read().items()):
                    family.add_metric([key], value)
                yield family
        if self.slots is not None:
            used, free = self.slots()
            slots = GaugeMetricFamily(
                "bacq_worker_slots", docs["bacq_worker_slots"], labels=["use"]
            )
            slots.add_metric(["used"], used)
            slots.add_metric(["free"], free)
            yield slots


_observed: _Observed | None = None
_serving: int | None = None


def observe(
    *,
    reconnects: Callable[[], int] | None = None,
    dead_letters: Callable[[], dict[str, int]] | None = None,
    offences: Callable[[], dict[str, int]] | None = None,
    slots: Callable[[], tuple[int, int]] | None = None,
) -> None:
    """Export counts a service keeps itself; a later call (a service that starts a new term
    after losing its lease) replaces the sources."""
    global _observed
    if _observed is None:
        _observed = _Observed()
        REGISTRY.register(_observed)
    _observed.reconnects, _observed.dead_letters = reconnects, dead_letters
    _observed.offences, _observed.slots = offences, slots


def start(port: int | None = None) -> int | None:
    """Serve /metrics on ``port`` (else ``$BACQ_METRICS_PORT``; none: no endpoint); once per
    process."""
    global _serving
    if _serving is not None:
        return _serving
    if port is None:
        value = os.environ.get(PORT_ENV)
        if not value:
            return None
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise ConfigError(f"{PORT_ENV} must be a TCP port number, not {value!r}")
        port = int(value)
    addr = os.environ.get(ADDR_ENV, "127.0.0.1")
    try:
        start_http_server(port, addr=addr)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {addr}:{port}: {exc.strerror}; choose another "
            f"--metrics-port ({PORT_ENV})"
        ) from None
    _serving = port
    return port


def markdown() -> str:
    """docs/metrics.md, from the definitions above."""
    lines = [
        "# Metrics",
        "",
        "Generated by `python -m bacq.metrics > docs/metrics.md` from `bacq/metrics.py`; a test",
        "fails when this page is stale. Each service (`bacq requester`, `bacq verifier`,",
        "`bacq worker`) serves them at `http://127.0.0.1:PORT/metrics` when started with",
        "`--metrics-port PORT` (or `BACQ_METRICS_PORT`; `BACQ_METRICS_ADDR` picks the address).",
        "The process metrics of prometheus-client (`process_*`, `python_*`) come along.",
        "",
        "| metric | type | labels | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, kind, text, labels in METRICS:
        shown = ", ".join(f"`{label}`" for label in labels) or "-"
        lines.append(f"| `{name}` | {kind} | {shown} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m bacq.metrics > docs/metrics.md
    sys.stdout.write(markdown())
