"""Saying the same refusal once per interval: a misconfigured peer retries forever, its log lines must not."""

from __future__ import annotations

import time
from typing import Any

REPEAT_LOG_S = 10.0
"""The same refusal (same peer, same reason) is logged at most once per this many seconds, with a count."""


class Throttle:
    """Say the same thing at most once per `interval`; `due` returns how many times it was suppressed, or None."""

    def __init__(self, interval: float = REPEAT_LOG_S) -> None:
        self.interval = interval
        self.last: dict[Any, tuple[float, int]] = {}

    def due(self, key: Any, now: float | None = None) -> int | None:
        now = time.monotonic() if now is None else now
        last, suppressed = self.last.get(key, (-float("inf"), 0))
        if now - last >= self.interval:
            self.last[key] = (now, 0)
            return suppressed
        self.last[key] = (last, suppressed + 1)
        return None
