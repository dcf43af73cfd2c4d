"""bacq: compute over content-addressed data.

A client submits a job; the requester announces it on NATS; workers bid; the chosen workers run it
in Docker over IPFS inputs and send their results' CIDs to the verifier, which accepts a result when
enough CIDs match. This package exposes the pieces a program needs; the ``bacq`` command uses them.
They are imported on first use (``bacq.Client`` loads the client), so that ``import bacq`` and the
start of the ``bacq`` command stay fast.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bacq.client import Client
    from bacq.errors import (
        BacqError,
        CommandNotFound,
        ComponentError,
        ConfigError,
        ConnectError,
        DockerUnavailable,
        ExecutionError,
        ImageUnavailable,
        IpfsUnavailable,
        JobNotFound,
        JobTimeout,
        NatsUnavailable,
        RequestRejected,
        SpecError,
        StorageError,
    )
    from bacq.models import Execution, JobRecord, Verdict
    from bacq.spec import InputVolume, JobSpec, OutputVolume, Resources, json_schema, parse_spec
    from bacq.states import ExecState, JobState
    from bacq.storage import Storage
    from bacq.wasmjobs import run_python


__version__ = "0.1.0"

__all__ = [
    "BacqError",
    "Client",
    "CommandNotFound",
    "ComponentError",
    "ConfigError",
    "ConnectError",
    "DockerUnavailable",
    "ExecState",
    "Execution",
    "ExecutionError",
    "ImageUnavailable",
    "InputVolume",
    "IpfsUnavailable",
    "JobNotFound",
    "JobRecord",
    "JobSpec",
    "JobState",
    "JobTimeout",
    "NatsUnavailable",
    "OutputVolume",
    "RequestRejected",
    "Resources",
    "SpecError",
    "Storage",
    "StorageError",
    "Verdict",
    "__version__",
    "json_schema",
    "parse_spec",
    "run_python",
]

# where each public name lives; imported on first access
_HOME = {
    "Client": "bacq.client",
    "run_python": "bacq.wasmjobs",
    "Storage": "bacq.storage",
    "Execution": "bacq.models",
    "JobRecord": "bacq.models",
    "Verdict": "bacq.models",
    "InputVolume": "bacq.spec",
    "JobSpec": "bacq.spec",
    "OutputVolume": "bacq.spec",
    "Resources": "bacq.spec",
    "json_schema": "bacq.spec",
    "parse_spec": "bacq.spec",
    "ExecState": "bacq.states",
    "JobState": "bacq.states",
}


def __getattr__(name: str) -> Any:
    import importlib

    home = _HOME.get(name) or ("bacq.errors" if name in __all__ else None)
    if home is None:
        raise AttributeError(f"module 'bacq' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
