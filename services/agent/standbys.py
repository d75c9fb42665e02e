"""Standby agents (`standby=True`, the default): once every agent has loaded, one more process per rank that
imports MindSpore and waits (zmserve/standby.py); a restart hands it its settings, so the new agent registers at
once instead of after its import (1-2 s idle, 15-20 s for eight on two cores). A standby is an optimisation:
never worth a failure, so one that cannot start, or STANDBY_FAILURES that die in a row, turn them off."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

from zmserve.logs import get_logger
from zmserve.standby import STANDBY_FLAG, activate, retire
from zmserve.supervision import reap
from zmserve_services.agent.agent import AgentSettings
from zmserve_services.agent.processes import AgentProcess, LauncherError, Standby, read_all
from zmserve_services.agent.spawner import AgentSpawner, release, release_parts
from zmserve_services.agent.status_pipe import StatusPipe

log = get_logger("launcher")

STANDBY_FAILURES = 3
"""Standby agents that die before they are used, in a row, after which the launcher stops starting them."""

Settings = Callable[[AgentProcess, StatusPipe | None, int | None, bool], AgentSettings]
"""What an agent process of this rank is told (the launcher's `settings`)."""


class Standbys:
    def __init__(self, enabled: bool, spawner: AgentSpawner, settings: Settings) -> None:
        self.enabled = enabled
        self.failures = 0
        self.spawner = spawner
        self.settings = settings

    def activate(self, agent: AgentProcess) -> bool:
        """Make the rank's standby (if it has one) its running process; False if it has none or it was lost."""
        standby, agent.standby = agent.standby, None
        if standby is None:
            return False
        agent.process, agent.status, agent.cgroup, agent.loaded = (standby.process, standby.status, standby.cgroup,
                                                                   False)
        agent.reasons = standby.reasons
        if activate(standby.process, self.settings(agent, standby.status, standby.reason_fd, True).to_argument()):
            self.failures, agent.started_at = 0, time.monotonic()
            log.info("standby_used", agent_rank=agent.rank, pid=standby.process.pid, restarts=agent.restarts)
            return True
        log.warning("standby_lost", agent_rank=agent.rank, pid=standby.process.pid)
        reap(standby.process, timeout=1.0)
        if agent.reasons is not None:
            read_all(agent.reasons)
            agent.reasons = None
        release(agent)
        agent.process = None
        return False

    def keep(self, agents: list[AgentProcess]) -> None:
        """Once every agent has loaded (so that their imports never compete with a forming group for the CPU),
        each rank gets a standby; a standby that died is dropped, and after STANDBY_FAILURES in a row the launcher
        stops starting them."""
        if not self.enabled:
            return
        for agent in agents:
            standby = agent.standby
            if standby is not None and standby.process.poll() is not None:
                agent.standby = None
                read_all(standby.reasons)
                release_parts(standby.status, standby.cgroup)
                self.failures += 1
                log.warning("standby_died", agent_rank=agent.rank, pid=standby.process.pid,
                            code=standby.process.returncode, failures=self.failures)
                if self.failures >= STANDBY_FAILURES:
                    self.enabled = False
                    log.warning("standby_disabled", why=f"{STANDBY_FAILURES} standby agents died before use")
                    return
        if not all(agent.process is not None and agent.loaded for agent in agents):
            return
        for position, agent in enumerate(agents):
            if agent.standby is None:
                cgroup, status = None, StatusPipe()
                reasons, reason_fd = os.pipe()
                try:
                    cgroup = self.spawner.new_cgroup(agent)
                    settings = self.settings(agent, status, reason_fd, False)
                    process = self.spawner.spawn(position, [STANDBY_FLAG, settings.to_argument()], status, cgroup,
                                                 reason_fd, stdin=subprocess.PIPE)
                except (LauncherError, OSError) as error:
                    read_all(reasons)
                    release_parts(status, cgroup)
                    self.enabled = False
                    log.warning("standby_disabled", why=f"a standby agent could not start: {error}")
                    return
                agent.standby = Standby(process, status, cgroup, reasons, reason_fd)
                log.info("standby_started", agent_rank=agent.rank, pid=process.pid)

    @staticmethod
    def retire(agents: list[AgentProcess]) -> None:
        """The launcher stops: every standby ends (they hold nothing the worker knows of)."""
        for agent in agents:
            if agent.standby is not None:
                retire(agent.standby.process)
                read_all(agent.standby.reasons)
                release_parts(agent.standby.status, agent.standby.cgroup)
                agent.standby = None
