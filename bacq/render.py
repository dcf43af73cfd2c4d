"""How the CLI shows things to a person: tables, the live view of a job, the verdict, formats.

Touches nothing but the consoles it is handed (rich). Machine formats (``json``/``yaml``) are
built here too, so every read command prints the same keys (documented in README.md).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import yaml
from rich.console import Console, Group, RenderableType
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from bacq.models import Execution, JobRecord, now
from bacq.states import EXEC_ACTIVE, ExecState, JobState

__all__ = [
    "EXEC_LABEL",
    "FORMATS",
    "LiveView",
    "dump",
    "duration",
    "exec_label",
    "plain_progress",
    "render_describe",
    "render_list",
    "render_nodes",
    "render_verdict",
    "styled",
]

FORMATS = ("table", "json", "yaml")

EXEC_LABEL: dict[ExecState, str] = {
    ExecState.BID: "bidding",
    ExecState.BID_REJECTED: "not chosen",
    ExecState.ACCEPTED: "accepted",
    ExecState.DOWNLOADING: "downloading inputs",
    ExecState.RUNNING: "running",
    ExecState.PUBLISHING: "publishing",
    ExecState.COMPLETED: "completed, awaiting verdict",
    ExecState.FAILED: "failed",
    ExecState.VERIFIED: "verified",
    ExecState.REJECTED: "rejected",
    ExecState.CANCELLED: "cancelled",
}

_STYLE: dict[str, str] = {
    JobState.ACCEPTED: "green",
    JobState.VOID: "yellow",
    JobState.FAILED: "red",
    JobState.CANCELLED: "yellow",
    ExecState.VERIFIED: "green",
    ExecState.REJECTED: "red",
    ExecState.BID_REJECTED: "dim",
    "online": "green",
    "offline": "red",
}
_MARK: dict[str, str] = {
    ExecState.VERIFIED: "✓",
    ExecState.REJECTED: "✗",
    ExecState.FAILED: "✗",
    ExecState.BID_REJECTED: "·",
    ExecState.CANCELLED: "·",
    ExecState.COMPLETED: "…",
}


def styled(state: str, label: str | None = None) -> str:
    style = _STYLE.get(str(state))
    text = label or str(state)
    return f"[{style}]{text}[/]" if style else text


def exec_label(state: ExecState) -> str:
    return EXEC_LABEL.get(state, str(state))


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _when(moment: dt.datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def dump(data: Any, fmt: str) -> str:
    """``data`` (plain JSON-able values) as ``json`` or ``yaml`` text."""
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return json.dumps(data, indent=2)


# -- the live view of ``bacq run`` -------------------------------------------------------------
class LiveView:
    """What ``bacq run`` shows on a terminal while it waits: one line per worker, the job state."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.started = time.monotonic()
        self.job: JobRecord | None = None
        self._spinners: dict[str, Spinner] = {}

    def update(self, job: JobRecord) -> None:
        self.job = job

    def _spinner(self, key: str) -> Spinner:
        if key not in self._spinners:
            self._spinners[key] = Spinner("dots", style="cyan")
        return self._spinners[key]

    def __rich__(self) -> RenderableType:
        job = self.job
        elapsed = duration(time.monotonic() - self.started)
        state = JobState.PENDING if job is None else job.state
        head = Table.grid(padding=(0, 1))
        head.add_row(
            Text.from_markup(f"[bold]job {self.job_id}[/]"),
            self._spinner("") if job is None or not job.final else Text(""),
            Text.from_markup(styled(state)),
            Text(f"elapsed {elapsed}", style="dim"),
        )
        rows = Table.grid(padding=(0, 2))
        rows.add_column(no_wrap=True)  # mark
        rows.add_column(no_wrap=True, min_width=4)  # node
        rows.add_column(no_wrap=True, min_width=12)  # state
        rows.add_column(no_wrap=True, justify="right")  # time in state
        rows.add_column(overflow="ellipsis", no_wrap=True)  # detail
        executions = [] if job is None else sorted(job.executions.values(), key=_exec_order)
        at = now()
        for execution in executions:
            mark: RenderableType
            if execution.state in EXEC_ACTIVE or execution.state == ExecState.BID:
                mark = self._spinner(execution.node_id)
            else:
                mark = Text(_MARK.get(execution.state, " "))
            rows.add_row(
                mark,
                execution.node_id,
                Text.from_markup(styled(execution.state, exec_label(execution.state))),
                duration((at - execution.updated_at).total_seconds()),
                Text(_exec_note(execution), style="dim"),
            )
        if not executions:
            rows.add_row(" ", "", Text("waiting for bids…", style="dim"), "", "")
        if job is not None and job.final:
            return Group(head, rows)
        hint = Text("Ctrl-C detaches; the job goes on.", style="dim")
        return Group(head, rows, hint)


def _exec_order(execution: Execution) -> tuple[int, str]:
    return (1 if execution.state == ExecState.BID_REJECTED else 0, execution.node_id)


def _exec_note(execution: Execution) -> str:
    if execution.error:
        return execution.error
    if execution.state == ExecState.REJECTED and execution.result_cid:
        return f"outvoted: its result {execution.result_cid[:14]}… differs"
    if execution.state in (ExecState.VERIFIED, ExecState.REJECTED, ExecState.COMPLETED) and (
        execution.exit_code is not None
    ):
        return f"exit code {execution.exit_code}"
    return execution.detail


def plain_progress(job: JobRecord, seen: dict[str, str]) -> list[str]:
    """Lines for what changed since ``seen`` (updated): the non-terminal form of the live view."""
    lines = []
    if seen.get("") != job.state:
        seen[""] = job.state
        lines.append(f"  job {styled(job.state)}" + (f": {job.reason}" if job.reason else ""))
    for node, execution in sorted(job.executions.items()):
        if seen.get(node) != execution.state:
            seen[node] = execution.state
            note = execution.error or execution.detail
            lines.append(
                f"  {node}: {styled(execution.state, exec_label(execution.state))}"
                + (f" ({note})" if note else "")
            )
    return lines


def _tail(data: bytes | None, lines: int) -> list[str]:
    if data is None:
        return []
    text = data.decode("utf-8", errors="replace").rstrip("\n")
    return text.splitlines()[-lines:] if text else []


def render_verdict(
    console: Console,
    job: JobRecord,
    *,
    elapsed: float | None = None,
    stdout: bytes | None = None,
    stderr: bytes | None = None,
    output_note: str = "",
    tail_lines: int = 10,
) -> None:
    """The end of ``bacq run``: verdict, exit code, last output lines, result CID, what next."""
    took = f"  [dim](after {duration(elapsed)})[/]" if elapsed is not None else ""
    if job.state != JobState.ACCEPTED:
        console.print(f"{styled(job.state)}: {job.reason}{took}")
        for execution in sorted(job.executions.values(), key=lambda e: e.node_id):
            if execution.error:
                console.print(f"  {execution.node_id}: {execution.error}")
        console.print(f"details: bacq describe {job.id}")
        return
    console.print(f"{styled(job.state)}: {job.reason}{took}")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    code = "?" if job.exit_code is None else str(job.exit_code)
    grid.add_row("exit code", code if not job.exit_code else f"[yellow]{code}[/]")
    grid.add_row("result CID", job.result_cid or "")
    console.print(grid)
    if job.exit_code:
        console.print(
            f"[yellow]the command exited with code {job.exit_code}[/] (its result was verified)"
        )
    for name, data in (("stdout", stdout), ("stderr", stderr)):
        if data is None:
            continue
        shown = _tail(data, tail_lines)
        if not shown:
            console.print(f"[dim]── {name}: (empty)[/]")
            continue
        count = "last line" if len(shown) == 1 else f"last {len(shown)} lines"
        console.print(f"[dim]── {name} ({count}) ──[/]")
        for line in shown:
            console.print(Text(line))
    if output_note:
        console.print(f"[dim]{output_note}[/]")
    console.print(f"fetch it: [bold]bacq get {job.id} --output-dir {job.id}[/]")


# -- tables ------------------------------------------------------------------------------------
def render_describe(console: Console, job: JobRecord) -> None:
    spec = job.spec
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("Job", job.id)
    grid.add_row("State", styled(job.state) + (f"  ({job.reason})" if job.reason else ""))
    grid.add_row("Image", spec.image)
    if spec.entrypoint:
        grid.add_row("Entrypoint", json.dumps(spec.entrypoint))
    grid.add_row("Command", json.dumps(spec.command))
    for volume in spec.inputs:
        grid.add_row("Input", f"{volume.cid} → {volume.path}")
    for output in spec.outputs:
        grid.add_row("Output", f"{output.name} ← {output.path}")
    if spec.labels:
        grid.add_row("Labels", ", ".join(f"{k}={v}" for k, v in sorted(spec.labels.items())))
    if spec.node_selector:
        grid.add_row(
            "Selector", ", ".join(f"{k}={v}" for k, v in sorted(spec.node_selector.items()))
        )
    grid.add_row(
        "Verification",
        f"{spec.verifier}, concurrency {spec.concurrency}, confidence {spec.confidence}"
        + (f", min_bids {spec.min_bids}" if spec.min_bids else ""),
    )
    grid.add_row(
        "Limits",
        f"cpu {spec.resources.cpu:g}, memory {spec.resources.memory} B, timeout {spec.timeout:g}s",
    )
    grid.add_row("Created", _when(job.created_at))
    grid.add_row("Updated", _when(job.updated_at))
    if job.result_cid:
        grid.add_row("Result", job.result_cid)
    if job.exit_code is not None:
        grid.add_row("Exit code", str(job.exit_code))
    console.print(grid)
    if job.executions:
        table = Table(title="Executions", title_justify="left", expand=False)
        for column in ("NODE", "STATE", "UPDATED", "EXIT", "RESULT CID", "DETAIL"):
            table.add_column(column, overflow="fold")
        for execution in sorted(job.executions.values(), key=lambda e: e.node_id):
            table.add_row(
                execution.node_id,
                styled(execution.state),
                _when(execution.updated_at),
                "" if execution.exit_code is None else str(execution.exit_code),
                execution.result_cid or "",
                execution.error or execution.detail,
            )
        console.print(table)
    if job.final and job.result_cid:
        console.print(f"fetch it: bacq get {job.id} --output-dir {job.id}")
    elif not job.final:
        console.print(f"follow it: bacq logs -f {job.id}")


def _chosen(job: JobRecord) -> list[Execution]:
    return [
        e for e in job.executions.values() if e.state not in (ExecState.BID, ExecState.BID_REJECTED)
    ]


def render_list(console: Console, jobs: list[JobRecord], *, wide: bool = False) -> None:
    table = Table(box=None, pad_edge=False)
    columns = ["ID", "STATE", "IMAGE", "CREATED", "VERIFIED", "RESULT"]
    if wide:
        columns += ["EXIT", "UPDATED", "NODES", "LABELS", "REASON"]
    for column in columns:  # ids and CIDs stay whole: other columns fold first
        table.add_column(column, overflow="fold", no_wrap=column in ("ID", "RESULT"))
    for job in jobs:
        chosen = _chosen(job)
        verified = sum(1 for e in chosen if e.state == ExecState.VERIFIED)
        row = [
            job.id,
            styled(job.state),
            job.spec.image,
            _when(job.created_at),
            f"{verified}/{len(chosen)}",
            job.result_cid or "",
        ]
        if wide:
            row += [
                "" if job.exit_code is None else str(job.exit_code),
                _when(job.updated_at),
                ",".join(sorted(e.node_id for e in chosen)),
                ",".join(f"{k}={v}" for k, v in sorted(job.spec.labels.items())),
                job.reason,
            ]
        table.add_row(*row)
    console.print(table)


def _size(memory: int | None) -> str:
    if memory is None:
        return ""
    for unit, power in (("g", 3), ("m", 2), ("k", 1)):
        if memory >= 1024**power:
            return f"{memory / 1024**power:g}{unit}"
    return str(memory)


def render_nodes(console: Console, rows: list[dict[str, Any]], *, wide: bool = False) -> None:
    table = Table(box=None, pad_edge=False)
    columns = ["NODE", "STATUS", "LABELS", "CPU", "MEMORY", "JOBS", "HEARTBEAT", "VERIFIED"]
    if wide:
        columns += ["REJECTED", "OFFENCES", "RUNNING JOBS"]
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        status = "online" if row["online"] else "offline"
        if row.get("quarantined"):
            status = "quarantined"
        age = row["seconds_since_heartbeat"]
        cells = [
            row["node_id"],
            styled(status),
            ",".join(f"{k}={v}" for k, v in sorted(row["labels"].items())),
            "" if row["cpu"] is None else f"{row['cpu']:g}",
            _size(row["memory"]),
            f"{row['running']}/{row['max_jobs'] if row['max_jobs'] is not None else '?'}",
            "never" if age is None else f"{duration(age)} ago",
            f"{row['verified']} ✓ {row['rejected']} ✗",
        ]
        if wide:
            cells += [
                str(row["rejected"]),
                str(row.get("offences", 0)),
                ",".join(row["running_jobs"]),
            ]
        table.add_row(*cells)
    console.print(table)
    for row in rows:
        if row.get("quarantined"):
            console.print(
                f"{row['node_id']} is quarantined: {row['quarantined']}; "
                f"`bacq nodes release {row['node_id']}` lets it take jobs again"
            )
