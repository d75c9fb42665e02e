"""Per-sequence state an agent keeps for a stateful subgraph (a decoder's K/V cache), fed in and updated per call.

Two loaded MindIRs cannot share a Parameter in MindSpore 2.10 (docs: mindspore-cpu-facts.md), so the state is an
explicit input and output of each subgraph and lives here, in numpy, one array per sequence. A call names the
sequence of each batch row: `batch` stacks their arrays along the state's batch axis (the graph's state input),
`update` writes the graph's update output of each row at that row's time positions. A sequence's array is
allocated (zeros) on its first use and freed on `release`; at most `max_sequences` live at once, so a worker
that lost count cannot grow an agent's memory without bound. Nothing of the state travels to the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from zmserve.logs import get_logger
from zmserve.protocol import ErrorCode, ServingError

log = get_logger("agent")


@dataclass(frozen=True)
class StateSpec:
    """A subgraph's "state" entry of group_config.json (docs/PROTOCOL.md, the generation contract)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    """One sequence's array (no batch axis)."""
    batch_axis: int
    """Where the rows of a call stack in the graph's state input (and its update output)."""
    time_axis: int
    """The time axis in the graph's layout (with the batch axis), where an update is written."""
    update: str
    """The name of the output that holds the update (the graph's last output)."""
    positions: str
    """The data input that holds each row's first time position (int [B])."""

    @classmethod
    def from_config(cls, entry: dict[str, Any]) -> StateSpec:
        try:
            spec = cls(str(entry["name"]), str(entry["dtype"]), tuple(int(d) for d in entry["shape"]),
                       int(entry["batch_axis"]), int(entry["time_axis"]), str(entry["update"]),
                       str(entry["positions"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a subgraph's state entry is incomplete or malformed ({exc!r}): {entry}") from None
        if not 0 <= spec.batch_axis <= len(spec.shape) or not 0 <= spec.time_axis <= len(spec.shape) \
                or spec.time_axis == spec.batch_axis or any(d < 1 for d in spec.shape):
            raise ValueError(f"a subgraph's state entry has impossible axes or shape: {entry}")
        return spec

    @property
    def sequence_time_axis(self) -> int:
        """The time axis of one sequence's array (the batch axis removed)."""
        return self.time_axis - (1 if self.batch_axis < self.time_axis else 0)

    @property
    def bytes_per_sequence(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class SequenceStates:
    """The state arrays of the sequences this agent holds, for one state layout (shared by every subgraph of the
    shard that names the same state)."""

    def __init__(self, spec: StateSpec, max_sequences: int = 0) -> None:
        self.spec = spec
        self.max_sequences = max_sequences
        self.arrays: dict[int, np.ndarray] = {}

    @property
    def bytes(self) -> int:
        return len(self.arrays) * self.spec.bytes_per_sequence

    def release(self, sequences: list[int]) -> None:
        freed = [s for s in sequences if self.arrays.pop(s, None) is not None]
        if freed:
            log.debug("sequences_released", sequences=freed, held=len(self.arrays), state_bytes=self.bytes)

    def batch(self, sequences: list[int]) -> np.ndarray:
        """The graph's state input for rows `sequences` (a new sequence starts as zeros)."""
        for sequence in sequences:
            if sequence not in self.arrays:
                if self.max_sequences and len(self.arrays) >= self.max_sequences:
                    raise ServingError(ErrorCode.RESOURCE_EXHAUSTED,
                                       f"the agent holds {len(self.arrays)} sequences, its limit")
                self.arrays[sequence] = np.zeros(self.spec.shape, dtype=self.spec.dtype)
                log.debug("sequence_allocated", sequence=sequence, held=len(self.arrays), state_bytes=self.bytes)
        return np.stack([self.arrays[s] for s in sequences], axis=self.spec.batch_axis)

    def update(self, sequences: list[int], positions: np.ndarray, update: np.ndarray) -> None:
        """Write row b of `update` (the graph's update output) into sequence b's array, at time positions
        positions[b] .. positions[b] + T - 1."""
        spec = self.spec
        steps = update.shape[spec.time_axis]
        limit = spec.shape[spec.sequence_time_axis]
        if update.shape[spec.batch_axis] != len(sequences) or len(positions) != len(sequences):
            raise ServingError(ErrorCode.INTERNAL, f"state update of {update.shape[spec.batch_axis]} rows and "
                                                   f"{len(positions)} positions for {len(sequences)} sequences")
        for row, sequence in enumerate(sequences):
            start = int(positions[row])
            if start < 0 or start + steps > limit:
                raise ServingError(ErrorCode.INVALID_ARGUMENT,
                                   f"sequence {sequence}: positions {start}..{start + steps - 1} do not fit the "
                                   f"state's {limit} time steps")
            where: list[Any] = [slice(None)] * len(spec.shape)
            where[spec.sequence_time_axis] = slice(start, start + steps)
            self.arrays[sequence][tuple(where)] = np.take(update, row, axis=spec.batch_axis)
