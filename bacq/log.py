"""Logging setup: structlog everywhere, JSON lines in services, pretty output on a terminal.

Touches the process's logging configuration only. Call ``configure`` once at process start.
structlog (which loads rich for its console renderer) is imported only when something logs or
``configure`` runs eagerly: a short CLI command that logs nothing never pays for it.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import structlog

__all__ = ["configure", "get_logger"]

# what a lazy ``configure`` asked for, applied when structlog is first needed
_pending: dict[str, Any] | None = None


def configure(*, json: bool | None = None, level: str | None = None, lazy: bool = False) -> None:
    """Set up structlog. ``json=None`` picks JSON when stderr is not a terminal. ``lazy``: only
    remember the settings, and apply them when the first logger is used (if ever)."""
    global _pending
    if lazy and "structlog" not in sys.modules:
        _pending = {"json": json, "level": level}
        return
    _pending = None
    _apply(json=json, level=level)


def _apply(*, json: bool | None, level: str | None) -> None:
    import logging

    import structlog

    level_name = (level or os.environ.get("BACQ_LOG_LEVEL") or "INFO").upper()
    numeric = logging.getLevelNamesMapping().get(level_name, logging.INFO)
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # services log per job: a logger is built once, not on every call (a process configures
        # once, at start)
        cache_logger_on_first_use=json,
    )


def _structlog_logger(name: str, bound: dict[str, Any]) -> Any:
    global _pending
    import structlog

    if _pending is not None:
        settings, _pending = _pending, None
        _apply(**settings)
    return structlog.get_logger(component=name, **bound)


class _LazyLogger:
    """Stands for a structlog logger until first used; then imports structlog and delegates."""

    __slots__ = ("_bound", "_logger", "_name")

    def __init__(self, name: str, bound: dict[str, Any]) -> None:
        self._name = name
        self._bound = bound
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._logger is None:
            self._logger = _structlog_logger(self._name, self._bound)
        return getattr(self._logger, attr)


def get_logger(name: str, **bound: Any) -> structlog.stdlib.BoundLogger:
    # a lazy proxy: module-level loggers made at import follow the configuration done later
    if "structlog" in sys.modules and _pending is None:
        return cast("structlog.stdlib.BoundLogger", _structlog_logger(name, bound))
    return cast("structlog.stdlib.BoundLogger", _LazyLogger(name, bound))
