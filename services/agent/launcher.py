"""The agent launcher (`zmserve agent`, `startup_agents`): one agent process per model file on this machine.

It supervises them: an agent that exits to be restarted (the worker re-forms its group, or the worker went
away) or that crashed is started again, with backoff for crashes; an agent whose rank the worker rejected is
not, and the launcher stops with that reason. SIGINT/SIGTERM stop every agent and reap it.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.agent.agent import EXIT_REJECTED, EXIT_RESTART, EXIT_STOPPED
from zmserve.logs import get_logger
from zmserve.protocol import DEFAULT_AGENT_START_PORT, DEFAULT_DISTRIBUTED_ADDRESS, normalize_address
from zmserve.supervision import die_with_parent, reap

log = get_logger("launcher")
CRASH_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
SUPERVISE_INTERVAL_S = 0.1


class LauncherError(RuntimeError):
    pass


@dataclass
class AgentProcess:
    rank: int
    model_file: Path
    group_config_file: Path | None
    publish_address: str
    process: subprocess.Popen | None = None
    crashes: int = 0
    restart_at: float = 0.0
    restarts: int = 0


class AgentLauncher:
    def __init__(
        self,
        distributed_address: str = DEFAULT_DISTRIBUTED_ADDRESS,
        model_files: list[str] | tuple[str, ...] = (),
        group_config_files: list[str] | tuple[str, ...] | None = None,
        agent_start_port: int = DEFAULT_AGENT_START_PORT,
        agent_ip: str | None = None,
        rank_start: int | None = None,
        heartbeat_interval: float | None = None,
    ) -> None:
        if not model_files:
            raise LauncherError("no model files given: one agent runs per model file")
        if group_config_files and len(group_config_files) != len(model_files):
            raise LauncherError(f"{len(model_files)} model files but {len(group_config_files)} group config files")
        for path in model_files:
            if not Path(path).is_file():
                raise LauncherError(f"model file {path} does not exist")
        self.worker_address = normalize_address(distributed_address)
        self.agent_ip = agent_ip or "127.0.0.1"
        self.heartbeat_interval = heartbeat_interval
        first_rank = rank_start or 0
        self.agents = [
            AgentProcess(
                rank=first_rank + i,
                model_file=Path(model_files[i]),
                group_config_file=Path(group_config_files[i]) if group_config_files else None,
                publish_address=f"tcp://{self.agent_ip}:{agent_start_port + i}",
            )
            for i in range(len(model_files))
        ]
        # stop() runs in signal handlers, so it must take no lock the interrupted loop may hold (Event.set
        # would): it sets a flag and writes to a self-pipe the loop selects on.
        self.stop_requested = False
        self._wakeup_read, self._wakeup_write = os.pipe()
        self.failure: str | None = None

    def command(self, agent: AgentProcess) -> list[str]:
        command = [sys.executable, "-m", "services.agent.agent", "--worker", self.worker_address,
                   "--rank", str(agent.rank), "--model-file", str(agent.model_file),
                   "--host", self.agent_ip, "--publish-address", agent.publish_address]
        if agent.group_config_file is not None:
            command += ["--group-config-file", str(agent.group_config_file)]
        if self.heartbeat_interval is not None:
            command += ["--heartbeat-interval", str(self.heartbeat_interval)]
        return command

    def start(self, agent: AgentProcess) -> None:
        env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
        agent.process = subprocess.Popen(self.command(agent), env=env, preexec_fn=die_with_parent)
        log.info("agent_started", agent_rank=agent.rank, pid=agent.process.pid, restarts=agent.restarts)

    def run(self) -> int:
        """Start every agent and supervise until stopped; returns the exit code for the CLI."""
        log.info("launcher_started", worker=self.worker_address, ranks=[a.rank for a in self.agents])
        for agent in self.agents:
            self.start(agent)
        try:
            while not self.stop_requested:
                select.select([self._wakeup_read], [], [], SUPERVISE_INTERVAL_S)
                if not self.stop_requested:
                    self.supervise()
        finally:
            self.shutdown()
        if self.failure:
            log.error("launcher_failed", why=self.failure)
            return 2
        return 0

    def supervise(self) -> None:
        now = time.monotonic()
        for agent in self.agents:
            if agent.process is None:
                if now >= agent.restart_at:
                    agent.restarts += 1
                    self.start(agent)
                continue
            code = agent.process.poll()
            if code is None:
                continue
            agent.process = None
            if code == EXIT_REJECTED:
                self.failure = f"the worker rejected rank {agent.rank} (see the agent's log line)"
                self.stop()
                return
            if code in (EXIT_RESTART, EXIT_STOPPED):
                agent.crashes = 0
                agent.restart_at = now
                log.info("agent_exited", agent_rank=agent.rank, code=code, action="restart")
            else:
                backoff = CRASH_BACKOFF_S[min(agent.crashes, len(CRASH_BACKOFF_S) - 1)]
                agent.crashes += 1
                agent.restart_at = now + backoff
                log.warning("agent_crashed", agent_rank=agent.rank, code=code, restart_in=backoff)

    def stop(self) -> None:
        self.stop_requested = True
        os.write(self._wakeup_write, b"x")

    def shutdown(self) -> None:
        running = [a.process for a in self.agents if a.process is not None]
        for process in running:
            if process.poll() is None:
                process.terminate()
        for process in running:
            reap(process, timeout=5.0)
        for agent in self.agents:
            agent.process = None
        os.close(self._wakeup_read)
        os.close(self._wakeup_write)
        log.info("launcher_stopped")
