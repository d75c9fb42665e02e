"""What the worker knows about its agents and their collective groups.

`AgentRegistry` holds one `AgentRecord` per registered rank. `StageGroup` is one pipeline stage: its ranks, the
MindSpore scheduler process the stage's agents form their group around, and the addresses its data comes from
and goes to.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from zmserve.collective import start_scheduler
from zmserve.local import free_port
from zmserve.servable import DistributedModel
from zmserve.supervision import reap
from zmserve.transport import Liveness


class AgentState(StrEnum):
    REGISTERED = "registered"  # said hello, waits for the whole cluster
    CONFIGURED = "configured"  # told how to form its group; loading and joining
    READY = "ready"  # group formed, model loaded and warmed up


@dataclass
class AgentRecord:
    rank: int
    identity: bytes
    host: str
    pid: int
    publish_address: str
    liveness: Liveness
    state: AgentState = AgentState.REGISTERED
    signature: dict[str, Any] = field(default_factory=dict)


class AgentRegistry:
    """Registered agents by rank; at most one live agent per rank."""

    def __init__(self, model: DistributedModel) -> None:
        self.model = model
        self.by_rank: dict[int, AgentRecord] = {}

    def by_identity(self, identity: bytes) -> AgentRecord | None:
        return next((a for a in self.by_rank.values() if a.identity == identity), None)

    def check_new(self, rank: Any) -> str | None:
        """Why this rank cannot register now, or None if it can."""
        if not isinstance(rank, int) or not 0 <= rank < self.model.rank_size:
            return f"rank {rank!r} is outside this servable's ranks 0..{self.model.rank_size - 1}"
        if rank in self.by_rank:
            other = self.by_rank[rank]
            return f"rank {rank} is already held by the agent with pid {other.pid} on {other.host}"
        return None

    def add(self, record: AgentRecord) -> None:
        self.by_rank[record.rank] = record

    def remove(self, rank: int) -> AgentRecord | None:
        return self.by_rank.pop(rank, None)

    def missing(self) -> list[int]:
        return [r for r in range(self.model.rank_size) if r not in self.by_rank]

    def complete(self) -> bool:
        return len(self.by_rank) == self.model.rank_size

    def all_in(self, state: AgentState) -> bool:
        return self.complete() and all(a.state == state for a in self.by_rank.values())


@dataclass
class StageGroup:
    """One pipeline stage: a MindSpore collective group of `ranks`, formed around its own scheduler process."""

    index: int
    ranks: range
    scheduler_host: str
    scheduler_port: int = 0
    scheduler: subprocess.Popen | None = None

    @property
    def leader(self) -> int:
        """The rank that forwards the stage's output (every rank of a stage holds the same output)."""
        return self.ranks[0]

    def start_scheduler(self) -> None:
        self.scheduler_port = free_port(self.scheduler_host)
        self.scheduler = start_scheduler(self.scheduler_host, self.scheduler_port, len(self.ranks))

    def stop_scheduler(self) -> None:
        if self.scheduler is not None:
            reap(self.scheduler, timeout=2.0)
            self.scheduler = None
