"""structlog set-up: readable lines on a terminal, one JSON object per line otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(level: str = "info", stream: Any = None) -> None:
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    renderer: Any = structlog.dev.ConsoleRenderer(colors=tty) if tty else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get(**context: Any) -> Any:
    return structlog.get_logger("imgpipe").bind(**context)
