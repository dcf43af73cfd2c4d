"""Every exception bacq raises on purpose, in one tree. Touches nothing.

    BacqError                      base: anything bacq means to say to a person
    ├── ConfigError                a setting (flag, env var, file) is missing or malformed
    ├── SpecError                  a job spec is invalid; ``.problems`` lists (field, message) pairs
    ├── JobNotFound                no job has this id (or the prefix names none or several)
    ├── ConnectError               a service could not be reached
    │   ├── NatsUnavailable        nats-server did not answer at BACQ_NATS_URL
    │   ├── IpfsUnavailable        the kubo RPC API did not answer at BACQ_IPFS_API
    │   └── DockerUnavailable      the Docker daemon did not answer
    ├── StorageError               an IPFS operation failed or took too long, or a tar was unsafe
    │   └── InputUnavailable       no reachable node gave a job's input in time (or the worker's
    │                              kubo is away): another worker may reach it
    ├── ExecutionError             a job could not run to completion on a worker
    │   ├── ImageUnavailable       the image is not present and could not be pulled
    │   ├── CommandNotFound        the entrypoint/command does not exist in the image
    │   └── JobTimeout             the container outlived the job's timeout and was killed
    ├── RequestRejected            the requester answered a request with an error
    │   └── BatchRejected          it refused some specs of a bulk submission
    ├── Fenced                     another instance of this service took over (its lease, or a
    │                              job record changed under it): this one must stop
    └── ComponentError             a local component (nats-server, kubo) failed to start

Every message is one line a person can act on: what went wrong, and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "BacqError",
    "BatchRejected",
    "CommandNotFound",
    "ComponentError",
    "ConfigError",
    "ConnectError",
    "DockerUnavailable",
    "ExecutionError",
    "Fenced",
    "ImageUnavailable",
    "InputUnavailable",
    "IpfsUnavailable",
    "JobNotFound",
    "JobTimeout",
    "NatsUnavailable",
    "RequestRejected",
    "ResultsTooLarge",
    "SpecError",
    "StorageError",
]


class BacqError(Exception):
    """Base of every error bacq raises on purpose; its message is meant for a person."""


class ConfigError(BacqError):
    """A setting is missing or malformed."""


class SpecError(BacqError):
    """A job spec failed validation. ``problems`` holds (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = [f"{field}: {message}" for field, message in problems]
        super().__init__("invalid job spec: " + "; ".join(lines))


class JobNotFound(BacqError):
    """No job matches the given id or prefix."""


class ConnectError(BacqError):
    """A service could not be reached."""


class NatsUnavailable(ConnectError):
    """nats-server did not answer."""


class IpfsUnavailable(ConnectError):
    """The kubo RPC API did not answer."""


class DockerUnavailable(ConnectError):
    """The Docker daemon did not answer."""


class StorageError(BacqError):
    """An IPFS operation failed, timed out, or returned unsafe content."""


class InputUnavailable(StorageError):
    """A CID could not be fetched in time (no reachable node had it), or the kubo node to fetch
    it through did not answer: a worker hands such a job back, so that another one tries."""


class ExecutionError(BacqError):
    """A job could not run to completion on a worker."""


class ResultsTooLarge(ExecutionError):
    """The job's outputs (output folders, stdout and stderr) exceed the worker's results limit."""


class ImageUnavailable(ExecutionError):
    """The image is not on the worker and could not be pulled."""


class CommandNotFound(ExecutionError):
    """The entrypoint or command does not exist in the image."""


class JobTimeout(ExecutionError):
    """The container ran past the job's timeout and was killed."""


class RequestRejected(BacqError):
    """The requester refused a request (for a spec error the problems come with it)."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        self.problems = problems or []
        super().__init__(message)


class ComponentError(BacqError):
    """A local component (nats-server, kubo, a bacq service) failed to start or stopped."""


class BatchRejected(RequestRejected):
    """The requester refused some specs of a bulk submission (``Client.submit_many``).
    ``problems`` name each as ``INDEX.field``; ``job_ids`` hold, in the order of the specs, the
    id of each one that was submitted (None for a refused one)."""

    def __init__(
        self, message: str, problems: list[tuple[str, str]], job_ids: list[str | None]
    ) -> None:
        self.job_ids = job_ids
        super().__init__(message, problems)


class Fenced(BacqError):
    """Another instance of this service is active now (it took the lease, or wrote a job record
    this one was about to overwrite). The service stops; its supervisor restarts it as a standby."""
