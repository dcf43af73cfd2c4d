"""The child process that compiles or runs one WebAssembly module with wasmtime. Touches only the
files named in its request: the module, the compiled module it writes or reads (the worker's own
cache), the preopened folders, the stdout/stderr files and its result file.

The worker starts it as ``python -I wasm_child.py compile|run REQUEST.json`` (a script, not
``-m``: importing the bacq package would cost the start-up of NATS and pydantic) and kills it at the
job's deadline, so that a guest blocked in a host call (``poll_oneoff``) stops too. The child
bounds itself before it reads anything the job supplied: address space while compiling, file size,
and, while running, the guest's linear memory (``Store.set_limits``), fuel and output size.

Deterministic mode (the default of wasm jobs) shadows the WASI calls whose answers depend on the
machine or the moment: the clocks start at a fixed instant and advance by a fixed step per reading;
sleeping (``poll_oneoff`` on a clock) advances that virtual clock instead of waiting; ``random_get``
is a SHA-256 counter stream seeded from the job id; directory listings come sorted by name with
cookies and inode numbers by position; file times and inode numbers read as fixed values. NaNs are
canonicalised and threads are off in the engine itself (``engine_config``), in both modes.

The result file holds JSON: ``exit_code``, ``fuel_used``, ``error`` (a kind: fuel, memory,
output, trap, invalid, compile) and ``message``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import struct
import sys
from collections.abc import Callable
from typing import Any

import wasmtime

WASI = "wasi_snapshot_preview1"
EPOCH_NS = 946_684_800 * 10**9  # 2000-01-01T00:00:00Z: where the virtual clock starts
CLOCK_STEP_NS = 1_000  # each reading of the virtual clock advances it by 1 µs
OUTPUT_EXIT = 97  # the child's own exit status when stdout/stderr went over their cap
_MAX_DIR_ENTRIES = 100_000  # a listing larger than this is refused (ENOMEM) in deterministic mode


def engine_config() -> wasmtime.Config:
    """The engine configuration of bacq's wasm jobs (WasmExecutor._settings names it in the
    compile cache's key: change both together)."""
    config = wasmtime.Config()
    config.consume_fuel = True
    config.cranelift_nan_canonicalization = True
    config.wasm_threads = False
    config.wasm_relaxed_simd_deterministic = True
    config.parallel_compilation = False  # the compile child uses one core of the worker
    return config


def _result(path: str, **fields: Any) -> None:
    data = {"exit_code": None, "fuel_used": None, "error": None, "message": "", **fields}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)


# -- compile -------------------------------------------------------------------------------------
def compile_module(request: dict[str, Any]) -> None:
    limit = int(request["memory_limit"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        engine = wasmtime.Engine(engine_config())
        with open(request["module"], "rb") as handle:
            data = handle.read()
        if not data.startswith(b"\0asm"):
            _result(
                request["result"],
                error="invalid",
                message="is not a WebAssembly module (no \\0asm header)",
            )
            return
        try:
            module = wasmtime.Module(engine, data)
        except wasmtime.WasmtimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
            _result(
                request["result"], error="invalid", message=f"is not valid WebAssembly: {first}"
            )
            return
        compiled = module.serialize()
        tmp = request["output"] + f".tmp{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(compiled)
        os.replace(tmp, request["output"])
        _result(request["result"], exit_code=0)
    except MemoryError:
        _result(
            request["result"],
            error="compile",
            message=f"compiling it needed more than the worker's {limit} bytes",
        )


# -- run -----------------------------------------------------------------------------------------
class _CappedFile:
    """stdout or stderr of the guest: written to a file, at most ``cap`` bytes for both together."""

    def __init__(self, path: str, budget: list[int], result: str) -> None:
        self._handle = open(path, "wb", buffering=0)  # noqa: SIM115 - lives as long as the run
        self._budget = budget
        self._result = result

    def write(self, data: bytes) -> int:
        if len(data) > self._budget[0]:
            self._handle.write(data[: self._budget[0]])
            _result(self._result, error="output", message="stdout and stderr")
            os._exit(OUTPUT_EXIT)  # the guest stops here: nothing of it runs after this
        self._budget[0] -= len(data)
        self._handle.write(data)
        return len(data)


class _Deterministic:
    """The shadowed WASI calls of deterministic mode (see the module docstring)."""

    def __init__(self, seed: bytes) -> None:
        self.now = EPOCH_NS
        self._seed = hashlib.sha256(b"bacq-wasm-random\0" + seed).digest()
        self._counter = 0
        self._pending = b""
        self._listings: dict[int, list[tuple[bytes, int]]] = {}

    # clocks: realtime, monotonic and cpu time all read the one virtual clock
    def clock_value(self, clock_id: int) -> int:
        self.now += CLOCK_STEP_NS
        return self.now if clock_id == 0 else self.now - EPOCH_NS

    def random_bytes(self, n: int) -> bytes:
        while len(self._pending) < n:
            block = hashlib.sha256(self._seed + self._counter.to_bytes(8, "little")).digest()
            self._pending += block
            self._counter += 1
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

    def link(self, linker: wasmtime.Linker, store: wasmtime.Store) -> None:
        """Shadow the WASI calls in ``linker``; call ``attach`` once the guest is instantiated."""
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        self._originals = {
            name: linker.get(store, WASI, name)
            for name in ("fd_readdir", "fd_filestat_get", "path_filestat_get")
        }
        self._store = store
        linker.allow_shadowing = True

        def define(name: str, params: list[wasmtime.ValType], fn: Callable[..., int]) -> None:
            linker.define_func(WASI, name, wasmtime.FuncType(params, [i32]), fn, access_caller=True)

        def memory(caller: wasmtime.Caller) -> wasmtime.Memory:
            mem = caller.get("memory")
            if not isinstance(mem, wasmtime.Memory):
                raise wasmtime.WasmtimeError("the module exports no memory")
            return mem

        def clock_time_get(caller: wasmtime.Caller, clock: int, _prec: int, ptr: int) -> int:
            if clock not in (0, 1, 2, 3):
                return 28  # WASI errno inval
            memory(caller).write(caller, struct.pack("<Q", self.clock_value(clock)), ptr)
            return 0

        def clock_res_get(caller: wasmtime.Caller, clock: int, ptr: int) -> int:
            if clock not in (0, 1, 2, 3):
                return 28
            memory(caller).write(caller, struct.pack("<Q", CLOCK_STEP_NS), ptr)
            return 0

        def random_get(caller: wasmtime.Caller, ptr: int, length: int) -> int:
            memory(caller).write(caller, self.random_bytes(length), ptr)
            return 0

        def poll_oneoff(
            caller: wasmtime.Caller, in_ptr: int, out_ptr: int, count: int, nevents_ptr: int
        ) -> int:
            if count <= 0:
                return 28
            mem = memory(caller)
            raw = bytes(mem.read(caller, in_ptr, in_ptr + 48 * count))
            clocks: list[tuple[int, int]] = []
            fds: list[tuple[int, int]] = []
            for i in range(count):
                sub = raw[48 * i : 48 * (i + 1)]
                userdata, tag = struct.unpack_from("<QB", sub, 0)
                if tag == 0:
                    clock_id, timeout, _precision, flags = struct.unpack_from("<IxxxxQQH", sub, 16)
                    base = self.now if clock_id == 0 else self.now - EPOCH_NS
                    deadline = timeout if flags & 1 else base + timeout
                    offset = 0 if clock_id == 0 else EPOCH_NS
                    clocks.append((userdata, deadline + offset))
                else:
                    fds.append((userdata, tag))
            events = b""
            if fds:  # descriptors are always ready: nothing here waits on the outside world
                for userdata, tag in fds:
                    events += struct.pack("<QHBxxxxxQHxxxxxx", userdata, 0, tag, 0, 0)
            else:
                self.now = max(self.now, min(deadline for _u, deadline in clocks))
                for userdata, deadline in clocks:
                    if deadline <= self.now:
                        events += struct.pack("<QHBxxxxxQHxxxxxx", userdata, 0, 0, 0, 0)
            mem.write(caller, events, out_ptr)
            mem.write(caller, struct.pack("<I", len(events) // 32), nevents_ptr)
            return 0

        def fd_readdir(
            caller: wasmtime.Caller, fd: int, buf: int, buf_len: int, cookie: int, used_ptr: int
        ) -> int:
            mem = memory(caller)
            listing = self._listings.get(fd) if cookie else None
            if listing is None:
                listing = []
                next_cookie = 0
                while True:  # the whole directory, through the real call, into the guest's buf
                    status = self._real("fd_readdir")(
                        caller, fd, buf, buf_len, next_cookie, used_ptr
                    )
                    if status != 0:
                        return int(status)
                    (used,) = struct.unpack("<I", bytes(mem.read(caller, used_ptr, used_ptr + 4)))
                    chunk = bytes(mem.read(caller, buf, buf + used))
                    pos = 0
                    progressed = False
                    while pos + 24 <= len(chunk):
                        d_next, _ino, namelen, kind = struct.unpack_from("<QQIB", chunk, pos)
                        if pos + 24 + namelen > len(chunk):
                            break
                        listing.append((chunk[pos + 24 : pos + 24 + namelen], kind))
                        next_cookie, pos, progressed = d_next, pos + 24 + namelen, True
                    if len(listing) > _MAX_DIR_ENTRIES:
                        return 48  # WASI errno nomem
                    if used < buf_len or not progressed:
                        break
                listing.sort()
                self._listings[fd] = listing
            out = bytearray()
            for index in range(cookie, len(listing)):
                name, kind = listing[index]
                out += struct.pack("<QQIBxxx", index + 1, index + 1, len(name), kind) + name
                if len(out) >= buf_len:
                    break
            data = bytes(out[:buf_len])
            mem.write(caller, data, buf)
            mem.write(caller, struct.pack("<I", len(data)), used_ptr)
            return 0

        def fixed_stat(caller: wasmtime.Caller, ptr: int) -> None:
            mem = memory(caller)
            stat = bytearray(mem.read(caller, ptr, ptr + 64))
            struct.pack_into("<QQ", stat, 0, 0, 0)  # device and inode
            struct.pack_into("<QQQ", stat, 40, EPOCH_NS, EPOCH_NS, EPOCH_NS)  # a, m, c times
            mem.write(caller, bytes(stat), ptr)

        def fd_filestat_get(caller: wasmtime.Caller, fd: int, ptr: int) -> int:
            status = int(self._real("fd_filestat_get")(caller, fd, ptr))
            if status == 0:
                fixed_stat(caller, ptr)
            return status

        def path_filestat_get(
            caller: wasmtime.Caller, fd: int, flags: int, path: int, length: int, ptr: int
        ) -> int:
            status = int(self._real("path_filestat_get")(caller, fd, flags, path, length, ptr))
            if status == 0:
                fixed_stat(caller, ptr)
            return status

        define("clock_time_get", [i32, i64, i32], clock_time_get)
        define("clock_res_get", [i32, i32], clock_res_get)
        define("random_get", [i32, i32], random_get)
        define("poll_oneoff", [i32, i32, i32, i32], poll_oneoff)
        define("fd_readdir", [i32, i32, i32, i64, i32], fd_readdir)
        define("fd_filestat_get", [i32, i32], fd_filestat_get)
        define("path_filestat_get", [i32, i32, i32, i32, i32], path_filestat_get)

    def attach(self, guest: wasmtime.Instance) -> None:
        """Give the real WASI calls a caller whose memory is the guest's: a small trampoline
        module imports the guest's memory and the real calls and re-exports both (a WASI call
        made straight from the host has no caller memory to write into)."""
        memory = guest.exports(self._store).get("memory")
        if not isinstance(memory, wasmtime.Memory):
            return  # no memory: none of the shadowed calls can be used by this guest anyway
        engine = self._store.engine
        module = wasmtime.Module(engine, _TRAMPOLINE)
        imports: list[Any] = [memory]
        imports += [self._originals[name] for name in _TRAMPOLINE_CALLS]
        instance = wasmtime.Instance(self._store, module, imports)
        self._trampoline = {name: instance.exports(self._store)[name] for name in _TRAMPOLINE_CALLS}

    def _real(self, name: str) -> Any:
        return self._trampoline[name]


_TRAMPOLINE_CALLS = ("fd_readdir", "fd_filestat_get", "path_filestat_get")
_TRAMPOLINE = """
(module
  (import "env" "memory" (memory 0))
  (import "w" "fd_readdir" (func $readdir (param i32 i32 i32 i64 i32) (result i32)))
  (import "w" "fd_filestat_get" (func $fstat (param i32 i32) (result i32)))
  (import "w" "path_filestat_get" (func $pstat (param i32 i32 i32 i32 i32) (result i32)))
  (export "memory" (memory 0))
  (func (export "fd_readdir") (param i32 i32 i32 i64 i32) (result i32)
    (call $readdir (local.get 0) (local.get 1) (local.get 2) (local.get 3) (local.get 4)))
  (func (export "fd_filestat_get") (param i32 i32) (result i32)
    (call $fstat (local.get 0) (local.get 1)))
  (func (export "path_filestat_get") (param i32 i32 i32 i32 i32) (result i32)
    (call $pstat (local.get 0) (local.get 1) (local.get 2) (local.get 3) (local.get 4))))
"""


def run_module(request: dict[str, Any]) -> None:
    result = request["result"]
    cap = int(request["output_cap"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file past the cap: EFBIG, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap + 1, cap + 1))
    engine = wasmtime.Engine(engine_config())
    module = wasmtime.Module.deserialize_file(engine, request["compiled"])
    store = wasmtime.Store(engine)
    memory_limit = int(request["memory"])
    store.set_limits(memory_size=memory_limit, instances=2, tables=4, memories=1)
    fuel = int(request["fuel"])
    store.set_fuel(fuel)

    wasi = wasmtime.WasiConfig()
    wasi.argv = list(request["argv"])
    wasi.env = [(k, v) for k, v in request["env"].items()]
    for host, guest, writable in request["preopens"]:
        wasi.preopen_dir(host, guest, bool(writable))
    budget = [cap]
    stdout = _CappedFile(request["stdout"], budget, result)
    stderr = _CappedFile(request["stderr"], budget, result)
    wasi.stdout_custom = stdout.write
    wasi.stderr_custom = stderr.write
    store.set_wasi(wasi)

    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    shims = _Deterministic(request["seed"].encode()) if request["deterministic"] else None
    if shims is not None:
        shims.link(linker, store)

    def used() -> int:
        return fuel - store.get_fuel()

    def memory_size() -> int:
        for export in module.exports:
            if isinstance(export.type, wasmtime.MemoryType):
                break
        else:
            return 0
        mem = instance.exports(store).get(export.name) if instance is not None else None
        return mem.data_len(store) if isinstance(mem, wasmtime.Memory) else 0

    instance: wasmtime.Instance | None = None
    try:
        instance = linker.instantiate(store, module)
        if shims is not None:
            shims.attach(instance)
        start = instance.exports(store).get("_start")
        if not isinstance(start, wasmtime.Func):
            _result(
                result, error="invalid", message="exports no _start function (not a WASI command)"
            )
            return
        start(store)
        exit_code = 0
    except wasmtime.ExitTrap as exc:
        exit_code = exc.code
    except wasmtime.Trap as exc:
        if exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            _result(result, error="fuel", fuel_used=used(), message=str(fuel))
            return
        _result(result, error="trap", fuel_used=used(), message=_first_line(exc))
        return
    except wasmtime.WasmtimeError as exc:
        _result(result, error="trap", fuel_used=used(), message=_first_line(exc))
        return
    if exit_code != 0 and memory_size() > memory_limit - 8 * 1024 * 1024:
        _result(result, error="memory", fuel_used=used(), message=str(memory_limit))
        return
    _result(result, exit_code=exit_code, fuel_used=used())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the worker that started it dies (a job must not outlive it)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the call above
        os._exit(1)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("compile", "run"):
        print("usage: wasm_child.py compile|run REQUEST.json", file=sys.stderr)
        return 2
    with open(argv[2], encoding="utf-8") as handle:
        request = json.load(handle)
    _die_with_parent(int(request["parent"]))
    if argv[1] == "compile":
        compile_module(request)
    else:
        run_module(request)
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    os._exit(code)  # not the interpreter's teardown: wasmtime's threads may panic in it
