"""Every NATS subject, stream, consumer and bucket name bacq uses. Touches nothing.

Core NATS (fire-and-forget or request/reply; losing one only delays a job, never corrupts it):

    bacq.api.submit                      client → requester   request: job spec → job id or problems
    bacq.api.submit_many                 client → requester   request: up to SUBMIT_MANY_MAX specs →
                                                              one job id (or problems) per spec
    bacq.api.cancel                      client → requester   request: job id → cancelled or why not
    bacq.api.release                     client → requester   request: release a quarantined node
    bacq.node.<node>.invite              requester → worker   an announcement for this worker only:
                                                              it has a free slot, please bid
    bacq.node.<node>.assign              requester → worker   request: you are chosen (or not)
    bacq.node.<node>.cancel              requester → worker   request: stop this job's container
    bacq.node.<node>.reveal              verifier → worker    request: every commitment is in,
                                                              reveal your result CID
    bacq.node.<node>.bid.<job>           worker → requester   a bid
    bacq.node.<node>.heartbeat           worker → requester   node info, every few seconds

Whoever sends on a ``bacq.node.<node>...``, ``bacq.exec.<job>.<node>`` or
``bacq.verify.<job>.<node>`` subject speaks for ``<node>``: the per-node NATS users
(``bacq.natsconf``) let a worker publish only under its own id, so the receivers take node and job
ids from the subject (``node_of``, ``job_and_node``) and drop a payload that names anyone else.

JetStream stream ``BACQ`` (file storage, dedup by Nats-Msg-Id; nothing here is lost):

    bacq.exec.<job>.<node>               worker → requester   execution progress (downloading, ...)
    bacq.verify.<job>.<node>             worker → verifier    the verification subject: first a
                                                              commitment to the result CID, then,
                                                              when asked, the CID itself

JetStream stream ``BACQ_VERDICTS`` (file storage; only the verifier writes it, so no worker can
take a verdict's dedup id): ``bacq.verdict.<job>``, the verdict and per-node outcome.

JetStream stream ``BACQ_DEAD``: ``bacq.dead.<consumer>``, each message a consumer gave up on (it
did not fit, or failed ``MAX_DELIVER`` times), with the reason in a header (``bacq events
--dead-letters`` shows them).

JetStream stream ``BACQ_EVENTS`` (file storage, dedup; retention by age and size, set by the
requester): ``bacq.events.<job>``, every state change of a job and its executions, hash-chained
(see ``bacq.events``). ``bacq history`` and ``bacq events`` replay it.

Key-value buckets: ``bacq-jobs`` (key = job id, value = the job record; written by the requester
only), ``bacq-results`` (key = job id, the results the verifier has collected; verifier only) and
``bacq-idempotency`` (key = hash of a client's idempotency key, value = the job id it created),
``bacq-answers`` (key = a deterministic job's answer key, value = the accepted job that
answers it; requester only), ``bacq-reputation`` (key = node id, what its messages and results
earned it; requester and verifier), ``bacq-leases`` (key = role: which requester and which
verifier is active, see ``bacq.lease``) and ``bacq-keys`` (key ``requester``: the public keys
that sign job events, see ``bacq.signing``; requester only, clients read it).

Live output and node records (read by ``bacq logs`` and ``bacq nodes``; losing them loses no job):

    bacq.logs.<job>.<node>               worker → CLI         JetStream stream ``BACQ_LOGS``: the
                                                              stdout/stderr of a running container,
                                                              rate- and size-bounded (bacq.logs)
    bucket ``bacq-nodes``                worker → CLI         key = node id, value = its latest
                                                              heartbeat (NodeInfo); each worker
                                                              writes its own key only
"""

from __future__ import annotations

import re

__all__ = [
    "ANSWERS_BUCKET",
    "BIDS_ALL",
    "CANCEL",
    "DEAD_ALL",
    "DEAD_STREAM",
    "EVENTS_ALL",
    "EVENTS_STREAM",
    "EXEC_ALL",
    "HEARTBEATS_ALL",
    "IDEMPOTENCY_BUCKET",
    "JOBS_BUCKET",
    "KEYS_BUCKET",
    "LEASES_BUCKET",
    "LOGS_ALL",
    "LOGS_STREAM",
    "MAX_DELIVER",
    "NODES_BUCKET",
    "RELEASE",
    "REPUTATION_BUCKET",
    "REQUESTER_CONSUMER",
    "REQUESTER_VERDICT_CONSUMER",
    "RESULTS_BUCKET",
    "STREAM",
    "STREAM_SUBJECTS",
    "SUBMIT",
    "SUBMIT_MANY",
    "SUBMIT_MANY_MAX",
    "VERDICTS_STREAM",
    "VERDICT_ALL",
    "VERIFIER_CONSUMER",
    "VERIFY_ALL",
    "assign",
    "bid",
    "cancel",
    "dead",
    "events",
    "exec_update",
    "heartbeat",
    "invite",
    "is_token",
    "job_and_node",
    "logs",
    "logs_of_job",
    "node_of",
    "reveal",
    "verdict",
    "verify",
]

PREFIX = "bacq"
# job ids (j-<hex>) and node ids: what may stand in one token of a subject or a bucket key
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

SUBMIT = f"{PREFIX}.api.submit"
SUBMIT_MANY = f"{PREFIX}.api.submit_many"
SUBMIT_MANY_MAX = 1000  # specs in one bulk request (a client splits larger batches)
CANCEL = f"{PREFIX}.api.cancel"
RELEASE = f"{PREFIX}.api.release"
HEARTBEATS_ALL = f"{PREFIX}.node.*.heartbeat"
BIDS_ALL = f"{PREFIX}.node.*.bid.*"  # the requester's one subscription for every bid

STREAM = "BACQ"
EXEC_ALL = f"{PREFIX}.exec.>"
VERIFY_ALL = f"{PREFIX}.verify.>"
STREAM_SUBJECTS = [EXEC_ALL, VERIFY_ALL]
VERDICTS_STREAM = "BACQ_VERDICTS"
VERDICT_ALL = f"{PREFIX}.verdict.>"
DEAD_STREAM = "BACQ_DEAD"
DEAD_ALL = f"{PREFIX}.dead.>"
MAX_DELIVER = 5  # deliveries of one message before a consumer gives up on it (then: BACQ_DEAD)

# a job's completion and its verdict, often fetched together, fold into one commit
REQUESTER_CONSUMER = "requester"  # progress (BACQ stream)
REQUESTER_VERDICT_CONSUMER = "requester-verdicts"  # verdicts (BACQ_VERDICTS stream)
VERIFIER_CONSUMER = "verifier"

REPUTATION_BUCKET = "bacq-reputation"
ANSWERS_BUCKET = "bacq-answers"  # key = a deterministic job's answer key, value = accepted job
LEASES_BUCKET = "bacq-leases"  # key = role: the active requester and verifier (bacq.lease)
JOBS_BUCKET = "bacq-jobs"
RESULTS_BUCKET = "bacq-results"
IDEMPOTENCY_BUCKET = "bacq-idempotency"

EVENTS_STREAM = "BACQ_EVENTS"
EVENTS_ALL = (
    f"{PREFIX}.events.>"  # the verifier's collected results per job, so a restart loses none
)


def is_token(value: str) -> bool:
    """True when ``value`` can be one token of a subject (and a key of a bucket)."""
    return bool(_TOKEN.match(value))


def _token(value: str) -> str:
    # ids are generated by bacq (uuid hex, node names); refuse anything that would split a subject
    if not is_token(value):
        raise ValueError(f"{value!r} cannot be used in a NATS subject")
    return value


def bid(node_id: str, job_id: str) -> str:
    return f"{PREFIX}.node.{_token(node_id)}.bid.{_token(job_id)}"


def heartbeat(node_id: str) -> str:
    return f"{PREFIX}.node.{_token(node_id)}.heartbeat"


def reveal(node_id: str) -> str:
    return f"{PREFIX}.node.{_token(node_id)}.reveal"


def dead(consumer: str) -> str:
    return f"{PREFIX}.dead.{_token(consumer)}"


def node_of(subject: str) -> str:
    """The node a ``bacq.node.<node>....`` subject speaks for (ValueError otherwise)."""
    parts = subject.split(".")
    if len(parts) < 4 or parts[0] != PREFIX or parts[1] != "node" or not parts[2]:
        raise ValueError(f"{subject!r} is not a node subject")
    return parts[2]


def job_and_node(subject: str) -> tuple[str, str]:
    """(job, node) of ``bacq.exec.<job>.<node>``, ``bacq.verify.<job>.<node>`` and
    ``bacq.node.<node>.bid.<job>`` (ValueError otherwise)."""
    parts = subject.split(".")
    if len(parts) == 4 and parts[0] == PREFIX and parts[1] in ("exec", "verify", "logs"):
        return parts[2], parts[3]
    if len(parts) == 5 and parts[0] == PREFIX and parts[1] == "node" and parts[3] == "bid":
        return parts[4], parts[2]
    raise ValueError(f"{subject!r} names no job and node")


def invite(node_id: str) -> str:
    return f"{PREFIX}.node.{_token(node_id)}.invite"


def assign(node_id: str) -> str:
    return f"{PREFIX}.node.{_token(node_id)}.assign"


def cancel(node_id: str) -> str:
    return f"{PREFIX}.node.{_token(node_id)}.cancel"


def events(job_id: str) -> str:
    return f"{PREFIX}.events.{_token(job_id)}"


def exec_update(job_id: str, node_id: str) -> str:
    return f"{PREFIX}.exec.{_token(job_id)}.{_token(node_id)}"


def verify(job_id: str, node_id: str) -> str:
    return f"{PREFIX}.verify.{_token(job_id)}.{_token(node_id)}"


def verdict(job_id: str) -> str:
    return f"{PREFIX}.verdict.{_token(job_id)}"


# -- live output and node records (bacq logs, bacq nodes) ----------------------------------------
LOGS_STREAM = "BACQ_LOGS"  # its own stream: bounded by size and age, apart from the BACQ stream
LOGS_ALL = f"{PREFIX}.logs.>"
NODES_BUCKET = "bacq-nodes"


def logs(job_id: str, node_id: str) -> str:
    return f"{PREFIX}.logs.{_token(job_id)}.{_token(node_id)}"


def logs_of_job(job_id: str) -> str:
    return f"{PREFIX}.logs.{_token(job_id)}.*"


KEYS_BUCKET = "bacq-keys"  # the requester's public signing keys (bacq.signing); requester only
