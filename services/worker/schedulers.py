"""The MindSpore scheduler processes a worker runs: one per pipeline stage, around which its agents form a group.

A group that lost a member cannot be re-joined, so every restart of the agents gets new schedulers on new ports.
A scheduler is a Python process that imports MindSpore before it can listen (1-2 s idle, several seconds on a busy
machine), and every agent of the stage waits for it: so once the servable serves, each stage keeps a standby
scheduler (zmserve/standby.py) that a restart activates at once.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from zmserve.collective import activate_scheduler, start_scheduler, start_standby_scheduler
from zmserve.collective_tls import CollectiveTls
from zmserve.logs import get_logger
from zmserve.standby import retire
from zmserve.supervision import reap
from zmserve.transport import free_port

log = get_logger("worker")


@dataclass
class StageScheduler:
    """The scheduler of one stage's group of `group_size` agents, listening on host:port once started."""

    host: str
    group_size: int
    port: int = 0
    process: subprocess.Popen | None = None
    standby: subprocess.Popen | None = None
    tls: CollectiveTls | None = None
    """MindSpore's TLS for the group (zmserve/collective_tls.py); None = plain TCP."""
    keeps_standby: bool = True
    """False: every restart starts a scheduler from scratch (`--no-standby`: saves a process and its memory)."""

    def start(self) -> None:
        self.port = free_port(self.host)
        standby, self.standby = self.standby, None
        if standby is not None and activate_scheduler(standby, self.host, self.port, self.group_size, self.tls):
            self.process = standby
            log.debug("standby_scheduler_used", port=self.port, pid=standby.pid)
            return
        if standby is not None:
            reap(standby, timeout=1.0)
        self.process = start_scheduler(self.host, self.port, self.group_size, tls=self.tls)

    def keep_standby(self) -> None:
        """Have a standby ready for the next restart (called once the servable serves: its import then competes
        with nobody's group formation)."""
        if not self.keeps_standby:
            return
        if self.standby is not None and self.standby.poll() is not None:
            log.warning("standby_scheduler_died", code=self.standby.returncode)
            self.standby = None
        if self.standby is None:
            self.standby = start_standby_scheduler()

    def stop(self) -> None:
        if self.process is not None:
            reap(self.process, timeout=2.0)
            self.process = None

    def close(self) -> None:
        """The worker stops: the scheduler and its standby."""
        self.stop()
        if self.standby is not None:
            retire(self.standby)
            self.standby = None
