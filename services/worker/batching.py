"""Dynamic batching: instances of concurrent requests share one model call.

For a servable declared `with_batch_dim=True`, each instance at the model stage waits in the `Batcher` with
other instances of the same input shapes (instances of different shapes are never mixed). A batch leaves when
it is full (`max_batch_size`), when its oldest instance has waited `max_delay` seconds, or at once when the
pipeline is empty: instances only wait for company while the model is busy anyway.
A model exported with a fixed batch size gets its batches padded to that size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass
class PendingBatch:
    slots: list[tuple[Any, int]] = field(default_factory=list)
    rows: list[list[np.ndarray]] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)


@dataclass
class ReadyBatch:
    slots: list[tuple[Any, int]]
    inputs: list[np.ndarray]


class Batcher:
    def __init__(self, max_batch_size: int, max_delay: float, pad_to: int | None = None) -> None:
        self.max_batch_size = pad_to or max_batch_size
        self.max_delay = max_delay
        self.pad_to = pad_to
        self.pending: dict[ShapeKey, PendingBatch] = {}

    def add(self, slot: tuple[Any, int], row: list[np.ndarray]) -> None:
        key = tuple((value.dtype.str, value.shape) for value in row)
        batch = self.pending.setdefault(key, PendingBatch())
        batch.slots.append(slot)
        batch.rows.append(row)
        batch.arrived.append(time.monotonic())

    def discard(self, owner: Any) -> None:
        """Drop the waiting rows of `owner` (the first element of their slots): its request was cancelled."""
        for key, batch in list(self.pending.items()):
            keep = [i for i, (slot_owner, _) in enumerate(batch.slots) if slot_owner is not owner]
            if len(keep) == len(batch.slots):
                continue
            batch.slots = [batch.slots[i] for i in keep]
            batch.rows = [batch.rows[i] for i in keep]
            batch.arrived = [batch.arrived[i] for i in keep]
            if not batch.slots:
                del self.pending[key]

    def take_ready(self, now: float | None = None, idle: bool = False) -> list[ReadyBatch]:
        """Full batches, and batches whose oldest instance has waited max_delay; everything when `idle` (the
        pipeline is empty, so waiting would only add latency)."""
        now = now if now is not None else time.monotonic()
        ready = []
        for key, batch in list(self.pending.items()):
            size = self.max_batch_size
            while len(batch.slots) >= size:
                ready.append(self._stack(batch.slots[:size], batch.rows[:size]))
                del batch.slots[:size], batch.rows[:size], batch.arrived[:size]
            if batch.slots and (idle or now - batch.arrived[0] >= self.max_delay):
                ready.append(self._stack(batch.slots, batch.rows))
                batch.slots, batch.rows, batch.arrived = [], [], []
            if not batch.slots:
                del self.pending[key]
        return ready

    def seconds_until_due(self) -> float | None:
        if not self.pending:
            return None
        oldest = min(batch.arrived[0] for batch in self.pending.values())
        return max(0.0, oldest + self.max_delay - time.monotonic())

    def _stack(self, slots: list[tuple[Any, int]], rows: list[list[np.ndarray]]) -> ReadyBatch:
        if self.pad_to is not None and len(rows) < self.pad_to:
            rows = rows + [rows[-1]] * (self.pad_to - len(rows))
        return ReadyBatch(list(slots), [np.stack(column) for column in zip(*rows, strict=True)])
