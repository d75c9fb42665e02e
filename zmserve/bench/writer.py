"""The thread that owns stdout and the progress line."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import TextIO

import numpy as np

from zmserve.bench.records import Record

PROGRESS_INTERVAL_S = 1.0
FLUSH_INTERVAL_S = 0.05


class ResultWriter(threading.Thread):
    """Producers `put` records from any thread (including the client's IO thread), so answering a request never
    waits on a pipe; this thread writes them, one JSON line each, every `FLUSH_INTERVAL_S` (not one wake-up per
    record: the load generator should take as little CPU from the service it measures as it can), and redraws
    the progress line on stderr."""

    def __init__(self, out: TextIO, err: TextIO, progress: bool) -> None:
        super().__init__(name="bench-writer", daemon=True)
        self.out, self.err, self.progress = out, err, progress
        self.records: list[Record] = []
        self.sent = 0
        """Requests sent so far, for the progress line (set by whoever sends)."""
        self._pending: collections.deque[Record] = collections.deque()
        self._done = threading.Event()
        self._out_open = True
        self._started_at = time.monotonic()

    def put(self, record: Record) -> None:
        self._pending.append(record)  # deque.append is atomic: no lock, no wake-up

    def finish(self, timeout: float = 10.0) -> list[Record]:
        """Write what is queued, stop, and return every record (also when the thread never started)."""
        if not self.is_alive():
            self._take_pending()
            return self.records
        self._done.set()
        self.join(timeout)
        return self.records

    def run(self) -> None:
        next_progress = time.monotonic() + PROGRESS_INTERVAL_S
        while not self._done.wait(FLUSH_INTERVAL_S):
            self._write("".join(record.to_json() + "\n" for record in self._take_pending()))
            if self.progress and time.monotonic() >= next_progress:
                next_progress = time.monotonic() + PROGRESS_INTERVAL_S
                self._show_progress()
        self._write("".join(record.to_json() + "\n" for record in self._take_pending()))
        if self._out_open:
            with contextlib.suppress(BrokenPipeError, ValueError):
                self.out.flush()
        if self.progress:
            self.err.write("\r\033[K")
            self.err.flush()

    def _take_pending(self) -> list[Record]:
        taken = []
        while self._pending:
            taken.append(self._pending.popleft())
        self.records.extend(taken)
        return taken

    def _write(self, text: str) -> None:
        if not self._out_open or not text:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except (BrokenPipeError, ValueError):
            self._out_open = False

    def _show_progress(self) -> None:
        done = len(self.records)
        errors = sum(1 for r in self.records if not r.ok)
        elapsed = max(time.monotonic() - self._started_at, 1e-9)
        recent = [r.latency_ms for r in self.records[-200:] if r.ok]
        p50 = f"{float(np.median(recent)):.2f} ms" if recent else "-"
        self.err.write(f"\rsent {self.sent}  done {done}  errors {errors}  {done / elapsed:.1f} req/s  "
                       f"p50(last 200) {p50}   ")
        self.err.flush()
