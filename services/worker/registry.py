"""The MindSpore scheduler processes a worker runs: one per pipeline stage, around which its agents form a group.

A group that lost a member cannot be re-joined, so every restart of the agents gets new schedulers on new ports.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from zmserve.collective import SCHEDULER_ROLE, group_environment
from zmserve.supervision import die_with_parent, reap


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
        env = {**os.environ, **group_environment(SCHEDULER_ROLE, self.scheduler_host, self.scheduler_port,
                                                 len(self.ranks))}
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "services.worker.scheduler"], env=env,
            stdout=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )

    def stop_scheduler(self) -> None:
        if self.scheduler is not None:
            reap(self.scheduler, timeout=2.0)
            self.scheduler = None


def free_port(host: str) -> int:
    """A port free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
