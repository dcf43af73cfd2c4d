"""Logging setup: structlog everywhere, JSON lines in services, pretty output on a terminal.

Touches the process's logging configuration only. Call ``configure`` once at process start.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

__all__ = ["configure", "get_logger"]


def configure(*, json: bool | None = None, level: str | None = None) -> None:
    """Set up structlog. ``json=None`` picks JSON when stderr is not a terminal."""
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
        cache_logger_on_first_use=False,
    )


def get_logger(name: str, **bound: Any) -> structlog.stdlib.BoundLogger:
    # a lazy proxy: module-level loggers made at import follow the configuration done later
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(component=name, **bound)
    return logger
