"""Client-side building blocks of wasm and Python jobs: specs from arguments, local modules and
scripts added to IPFS first, and ``run_python`` for the Python API. Touches the local files it is
given, a temporary folder, the kubo node (``Storage``) and NATS (``Client``) it is handed.

A wasm job's ``image`` is its module (a CID, or a runtime the workers ship); a Python job runs on
the ``python-3.12`` runtime with its script and local modules in one folder, mounted read-only at
``/job`` (``PYTHON_MOUNT``) and run as ``python /job/SCRIPT ARGS``. The ``bacq run --engine wasm``
and ``bacq run python`` commands are thin layers over ``wasm_spec``, ``python_spec``,
``add_module`` and ``add_python``.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bacq.client import Client
from bacq.errors import SpecError
from bacq.models import JobRecord
from bacq.spec import JobSpec, parse_spec
from bacq.storage import Storage

__all__ = [
    "PYTHON_MOUNT",
    "PYTHON_RUNTIME",
    "add_module",
    "add_python",
    "check_script",
    "cli_spec",
    "python_spec",
    "run_python",
    "wasm_spec",
]

PYTHON_RUNTIME = "python-3.12"  # bacq.worker.wasm.PYTHON_RUNTIME
PYTHON_MOUNT = "/job"  # where a Python job's script folder is mounted
MAIN = "main.py"  # the script's name when it is given as code (-c)


def _volumes(
    inputs: Iterable[tuple[str, str]], outputs: Iterable[tuple[str, str]]
) -> dict[str, Any]:
    return {
        "inputs": [{"cid": cid, "path": path} for cid, path in inputs],
        "outputs": [{"name": name, "path": path} for name, path in outputs],
    }


def wasm_spec(
    module: str,
    args: Sequence[str] = (),
    *,
    inputs: Iterable[tuple[str, str]] = (),
    outputs: Iterable[tuple[str, str]] = (),
    **fields: Any,
) -> JobSpec:
    """A wasm job: ``module`` (a CID, see ``add_module``) run with ``args``; ``inputs`` are
    (cid, path) pairs, ``outputs`` (name, path) pairs; other spec fields as keywords."""
    return parse_spec(
        {
            "engine": "wasm",
            "image": module,
            "command": list(args),
            **_volumes(inputs, outputs),
            **fields,
        }
    )


def python_spec(
    folder_cid: str,
    script: str = MAIN,
    args: Sequence[str] = (),
    *,
    inputs: Iterable[tuple[str, str]] = (),
    outputs: Iterable[tuple[str, str]] = (),
    **fields: Any,
) -> JobSpec:
    """A Python job: ``script`` in the folder ``folder_cid`` (see ``add_python``), mounted at
    ``/job``, run with ``args`` on the workers' CPython for WASI."""
    return parse_spec(
        {
            "engine": "wasm",
            "image": PYTHON_RUNTIME,
            "command": [f"{PYTHON_MOUNT}/{script}", *args],
            **_volumes([(folder_cid, PYTHON_MOUNT), *inputs], outputs),
            **fields,
        }
    )


async def add_module(storage: Storage, path: Path) -> str:
    """Add a local ``.wasm`` file to IPFS and return its CID (refusing what is not WebAssembly)."""
    path = Path(path)
    try:
        header = await asyncio.to_thread(_header, path)
    except OSError as exc:
        raise SpecError([("image", f"cannot read the module {path}: {exc.strerror}")]) from None
    if header != b"\0asm":
        raise SpecError(
            [("image", f"{path} is not a WebAssembly module; build one for WASI (wasip1)")]
        )
    return await storage.add(path)


def _header(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(4)


def check_script(script: Path) -> None:
    """SpecError unless ``script`` is a file (an option given after ``python`` is named)."""
    if not script.is_file():
        hint = (
            "; options go before `python` (bacq run -v CID:/in -o out:/out python script.py"
            " ARGS): after it, everything is the script and its arguments"
            if str(script).startswith("-")
            else ""
        )
        raise SpecError([("command", f"{script} is not a file{hint}")])


async def add_python(
    storage: Storage,
    script: Path | None = None,
    *,
    code: str | None = None,
    modules: Iterable[Path] = (),
) -> tuple[str, str]:
    """Put a script (a file, or ``code``) and its local modules (files or package folders) in
    one folder, add it to IPFS; return (the folder's CID, the script's name in it)."""
    if (script is None) == (code is None):
        raise SpecError([("command", "give a script file or code (-c), not both or neither")])
    with tempfile.TemporaryDirectory(prefix="bacq-python-") as tmp:
        folder = Path(tmp) / "job"
        folder.mkdir()
        if script is not None:
            script = Path(script)
            check_script(script)
            name = script.name
            shutil.copyfile(script, folder / name)
        else:
            name = MAIN
            (folder / name).write_text(code or "")
        for module in modules:
            module = Path(module)
            if module.is_dir():
                shutil.copytree(module, folder / module.name, dirs_exist_ok=True)
            elif module.is_file():
                shutil.copyfile(module, folder / module.name)
            else:
                raise SpecError([("inputs", f"local module {module} does not exist")])
        return await storage.add(folder), name


async def run_python(
    client: Client,
    storage: Storage,
    script: Path | None = None,
    args: Sequence[str] = (),
    *,
    code: str | None = None,
    modules: Iterable[Path] = (),
    inputs: Iterable[tuple[str, str]] = (),
    outputs: Iterable[tuple[str, str]] = (),
    wait_timeout: float | None = None,
    **fields: Any,
) -> JobRecord:
    """Run a Python script (or ``code``) on the workers and wait for its final record (at most
    ``wait_timeout`` seconds: TimeoutError); ``fields`` are other spec fields (``timeout``...)."""
    cid, name = await add_python(storage, script, code=code, modules=modules)
    spec = python_spec(cid, name, args, inputs=inputs, outputs=outputs, **fields)
    job_id = await client.submit(spec)
    return await client.wait(job_id, timeout=wait_timeout)


async def cli_spec(
    storage: Storage,
    target: str,
    args: Sequence[str] = (),
    *,
    code: str | None = None,
    modules: Iterable[Path] = (),
    inputs: Iterable[tuple[str, str]] = (),
    outputs: Iterable[tuple[str, str]] = (),
    **fields: Any,
) -> JobSpec:
    """The spec of ``bacq run --engine wasm MODULE -- ARGS`` (``target`` a CID, or a local .wasm
    file added to IPFS first) or of ``bacq run python [script.py] ARGS`` / ``-c CODE``
    (``target`` "python": the script is the first of ``args`` unless ``code`` is given)."""
    if target == "python":
        rest = list(args)
        script: Path | None = None
        if code is None:
            if not rest:
                raise SpecError([("command", "give a script (bacq run python script.py) or -c")])
            script = Path(rest.pop(0))
        cid, name = await add_python(storage, script, code=code, modules=modules)
        return python_spec(cid, name, rest, inputs=inputs, outputs=outputs, **fields)
    module = target
    if await asyncio.to_thread(Path(target).is_file):
        module = await add_module(storage, Path(target))
    return wasm_spec(module, args, inputs=inputs, outputs=outputs, **fields)
