"""The MindSpore scheduler processes a worker runs: one per pipeline stage, around which its agents form a group.

A group that lost a member cannot be re-joined, so every restart of the agents gets new schedulers on new ports.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from zmserve.collective import start_scheduler
from zmserve.collective_tls import CollectiveTls
from zmserve.supervision import reap
from zmserve.transport import free_port


@dataclass
class StageScheduler:
    """The scheduler of one stage's group of `group_size` agents, listening on host:port once started."""

    host: str
    group_size: int
    port: int = 0
    process: subprocess.Popen | None = None
    tls: CollectiveTls | None = None
    """MindSpore's TLS for the group (zmserve/collective_tls.py); None = plain TCP."""

    def start(self) -> None:
        self.port = free_port(self.host)
        self.process = start_scheduler(self.host, self.port, self.group_size, tls=self.tls)

    def stop(self) -> None:
        if self.process is not None:
            reap(self.process, timeout=2.0)
            self.process = None
