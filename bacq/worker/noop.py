"""The ``noop`` executor: runs nothing and answers every job with the same fixed result folder.

For benchmarks and tests of the message path only (``bacq worker --executor noop``): submit → bid →
assign → result → verify → final state without Docker, input downloads or a per-job IPFS add.
Touches its own folder under the worker's work directory and, once at start, the worker's kubo node
(the fixed folder is added once; every job's result is that CID). Honest workers running it all
report the same CID, so deterministic verification accepts; ``--tamper`` still makes a liar.
"""

from __future__ import annotations

from pathlib import Path

from bacq.errors import ExecutionError
from bacq.spec import JobSpec
from bacq.states import ExecState
from bacq.worker.executor import ExecResult, JobContext, WorkerContext

__all__ = ["NOOP_STDOUT", "NoopExecutor"]

NOOP_STDOUT = b"noop: bacq ran no container for this job\n"


class NoopExecutor:
    """Accepts every job; its result is the folder ``write_result`` makes (stdout, stderr,
    exitCode 0), the same for every job and every worker, added to IPFS once by ``start``."""

    kind = "noop"
    allow_network = True

    def __init__(self) -> None:
        self.cid: str | None = None

    def why_not(self, spec: JobSpec) -> str | None:
        return None

    async def start(self, worker: WorkerContext) -> None:
        tamper = f"(tampered by {worker.node_id})\n" if worker.tamper else ""
        folder = self.write_result(worker.work_dir / "noop-result", tamper=tamper)
        self.cid = await worker.storage.add(folder)

    async def run(self, spec: JobSpec, job: JobContext) -> ExecResult:
        if self.cid is None:
            raise ExecutionError("the noop executor ran a job before its start added its result")
        await job.report(ExecState.RUNNING, "noop executor")
        return ExecResult(exit_code=0, cid=self.cid)

    def remove_leftovers(self, node_id: str, work_dir: str) -> list[str]:
        return []

    def close(self) -> None:
        pass

    def write_result(self, folder: Path, *, tamper: str = "") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "stdout").write_bytes(NOOP_STDOUT + tamper.encode())
        (folder / "stderr").write_bytes(b"")
        (folder / "exitCode").write_text("0")
        return folder
