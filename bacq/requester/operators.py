"""Who runs each worker node and what it may claim: the requester's operator config. Pure.

A worker's heartbeat says how much cpu, memory and how many job slots it offers; a stranger's
worker can say anything. The requester believes at most what its operator config allows for
that node (``limits``), and a node belongs to an operator, so that no two executions of one job
go to nodes of the same operator (a lazy operator's second node would only copy the first one's
result). Without a config every node is its own operator, capped by the defaults.

The config file (``bacq requester --nodes-config FILE`` or ``BACQ_NODES_CONFIG``), YAML or JSON::

    default: {cpu: 16, memory: 64GiB, max_jobs: 16}     # caps for nodes not listed
    nodes:
      w1: {operator: alice, cpu: 4, memory: 8GiB, max_jobs: 4}
      w2: {operator: alice}                            # alice's second node: never with w1
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bacq.errors import ConfigError
from bacq.models import NodeInfo
from bacq.spec import parse_memory

__all__ = ["NODES_CONFIG_ENV", "NodeLimits", "OperatorConfig", "load_operator_config"]

NODES_CONFIG_ENV = "BACQ_NODES_CONFIG"
_N = TypeVar("_N", int, float)


class NodeLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operator: str | None = None  # None: the node is its own operator
    cpu: float | None = Field(default=None, gt=0)
    memory: int | None = Field(default=None, gt=0)
    max_jobs: int | None = Field(default=None, ge=0)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> Any:
        return parse_memory(value) if isinstance(value, str) else value


class OperatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: NodeLimits = Field(
        default_factory=lambda: NodeLimits(cpu=16.0, memory=64 * 1024**3, max_jobs=16)
    )
    nodes: dict[str, NodeLimits] = Field(default_factory=dict)

    def operator(self, node_id: str) -> str:
        limits = self.nodes.get(node_id)
        return (limits.operator if limits is not None else None) or node_id

    def capped(self, info: NodeInfo) -> NodeInfo:
        """``info`` with what it claims cut down to what this config allows the node."""
        limits = self.nodes.get(info.node_id, self.default)
        cpu = _cap(info.cpu, limits.cpu, self.default.cpu)
        memory = _cap(info.memory, limits.memory, self.default.memory)
        max_jobs = _cap(info.max_jobs, limits.max_jobs, self.default.max_jobs)
        if (cpu, memory, max_jobs) == (info.cpu, info.memory, info.max_jobs):
            return info
        return info.model_copy(update={"cpu": cpu, "memory": memory, "max_jobs": max_jobs})


def _cap(claimed: _N, limit: _N | None, default: _N | None) -> _N:
    cap = limit if limit is not None else default
    return claimed if cap is None else min(claimed, cap)


def load_operator_config(path: str | Path | None) -> OperatorConfig:
    """The config at ``path`` (None: the defaults); ConfigError names the field at fault."""
    if path is None:
        return OperatorConfig()
    import yaml  # only when a file is given

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read the nodes config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"the nodes config {path} is not YAML/JSON: {exc}") from None
    try:
        return OperatorConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"nodes config {path}: {where}: {first['msg']} (see `bacq requester --help`)"
        ) from None
