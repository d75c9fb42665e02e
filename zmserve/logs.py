"""Structured logging: configured once per process, one event per line, with request id, servable and rank.

Context (`servable`, `rank`, `request_id`) is bound with structlog's contextvars so every line a process writes
carries it without passing loggers around.

Events that can come once per request or per message (a rejected request, a dropped late reply) go through
`Bursts`: a burst of them is one line as it starts and then summary lines with the count, never one line per
request.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import structlog

BURST_INTERVAL_S = 1.0
"""A burst's first summary comes this long after its first line; each further one twice as long after the last,
up to BURST_MAX_INTERVAL_S (a client polling a servable that starts up for a minute makes 7 lines, not 60)."""
BURST_MAX_INTERVAL_S = 60.0

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


@dataclass
class _Window:
    """One event (and key) that was logged in full at `opened`; what came after it is only counted."""

    opened: float
    interval: float
    repeated: int = 0
    level: str = "info"
    fields: dict[str, Any] = field(default_factory=dict)


class Bursts:
    """Log events that may repeat thousands of times a second without writing a line for each.

    The first occurrence of an event (per `key`, e.g. the error code) is logged as it comes. Occurrences in the
    `interval` after it are counted, and at the end of the interval one line stands for them all: the same event,
    with the fields of the last occurrence, plus `repeated` (how many occurrences the line stands for), `seconds`
    (the time they came in) and `per_second`. While the burst goes on, each summary covers twice the time of the
    one before, up to `max_interval`; once an interval passes with no occurrence, the next one is logged in full
    again.

    The tail of a burst is written by `flush`, which every service loop calls through `flush_bursts` (and with
    `final=True` when it stops), so no count is lost."""

    def __init__(self, logger: Any, interval: float = BURST_INTERVAL_S, max_interval: float = BURST_MAX_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval, self.max_interval, self.clock = logger, interval, max_interval, clock
        self._windows: dict[tuple[str, Hashable], _Window] = {}
        self._lock = threading.Lock()  # an agent counts in its main thread and flushes from its control thread
        _all_bursts.add(self)

    def debug(self, event: str, key: Hashable = None, **fields: Any) -> None:
        self._occurred("debug", event, key, fields)

    def info(self, event: str, key: Hashable = None, **fields: Any) -> None:
        self._occurred("info", event, key, fields)

    def warning(self, event: str, key: Hashable = None, **fields: Any) -> None:
        self._occurred("warning", event, key, fields)

    def error(self, event: str, key: Hashable = None, **fields: Any) -> None:
        self._occurred("error", event, key, fields)

    def exception(self, event: str, key: Hashable = None, **fields: Any) -> None:
        """Like `error`, with the traceback of the exception being handled on the line logged in full."""
        self._occurred("exception", event, key, fields)

    def _occurred(self, level: str, event: str, key: Hashable, fields: dict[str, Any]) -> None:
        now = self.clock()
        with self._lock:
            summary = self._close_if_over((event, key), now)
            window = self._windows.get((event, key))
            if window is None:
                self._windows[(event, key)] = _Window(now, self.interval)
            else:
                window.repeated, window.level, window.fields = window.repeated + 1, level, fields
        if summary is not None:
            self._write(*summary)
        if window is None:
            self._write(level, event, fields)

    def flush(self, now: float | None = None, final: bool = False) -> None:
        """Write the summary of every burst whose interval is over (every burst, when `final`)."""
        now = self.clock() if now is None else now
        with self._lock:
            summaries = [s for k in list(self._windows) if (s := self._close_if_over(k, now, final)) is not None]
        for summary in summaries:
            self._write(*summary)

    def _close_if_over(self, key: tuple[str, Hashable], now: float,
                       final: bool = False) -> tuple[str, str, dict[str, Any]] | None:
        """End the interval of `key` if it is over: the summary to write if anything repeated in it (and a new,
        longer interval counts from now, since the burst goes on), else nothing (and the next occurrence is new)."""
        window = self._windows.get(key)
        if window is None or (not final and now - window.opened < window.interval):
            return None
        if window.repeated == 0 or final:
            del self._windows[key]
        else:
            self._windows[key] = _Window(now, min(2 * window.interval, self.max_interval))
        if window.repeated == 0:
            return None
        level = "error" if window.level == "exception" else window.level
        seconds = max(now - window.opened, 1e-3)
        return level, key[0], {**window.fields, "repeated": window.repeated, "seconds": round(seconds, 3),
                               "per_second": round(window.repeated / seconds, 1)}

    def _write(self, level: str, event: str, fields: dict[str, Any]) -> None:
        getattr(self.logger, level)(event, **fields)


_all_bursts: weakref.WeakSet[Bursts] = weakref.WeakSet()
_next_flush = 0.0
FLUSH_INTERVAL_S = 0.1


def flush_bursts(final: bool = False) -> None:
    """Write the summaries that are due, of every `Bursts` in this process. Service loops call this after every
    wake-up; it looks at the bursts at most every FLUSH_INTERVAL_S, so a busy loop pays one clock read. The
    process's exit flushes everything (`final`)."""
    global _next_flush
    now = time.monotonic()
    if not final and now < _next_flush:
        return
    _next_flush = now + FLUSH_INTERVAL_S
    for bursts in list(_all_bursts):
        bursts.flush(final=final)


def flush_bursts_at_exit() -> None:
    """The last summaries; a stream already closed at exit (a test runner's capture) gets none, quietly."""
    with contextlib.suppress(ValueError, OSError):
        flush_bursts(final=True)


atexit.register(flush_bursts_at_exit)
