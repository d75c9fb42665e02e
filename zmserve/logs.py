"""Structured logging: configured once per process, one event per line, with request id, servable and rank.

Context (`servable`, `rank`, `request_id`) is bound with structlog's contextvars so every line a process writes
carries it without passing loggers around.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure_logging(level: str | None = None, json: bool | None = None) -> None:
    """Console lines on a terminal, JSON lines otherwise; level from the argument or ZMSERVE_LOG_LEVEL."""
    global _configured
    level_name = (level or os.environ.get("ZMSERVE_LOG_LEVEL", "info")).upper()
    if json is None:
        json = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level_name]),
        # one write() per line: agents of a launcher share its stderr, and print() writes the newline apart
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    if not _configured:
        configure_logging()
    return structlog.get_logger(name).bind(component=name)
