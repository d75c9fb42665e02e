"""The agent launcher (`zmserve agent`, `startup_agents`): one agent process per model file on this machine.

It supervises them: an agent that exits to be restarted (the worker re-forms its group, or the worker went
away) or that crashed is started again, with backoff for crashes; an agent whose rank the worker rejected is
not, and the launcher stops with that reason. SIGINT/SIGTERM stop every agent and reap it.
"""

from __future__ import annotations

import dataclasses
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from services.agent.agent import EXIT_REJECTED, EXIT_RESTART, EXIT_STOPPED, AgentSettings
from zmserve.logs import get_logger
from zmserve.protocol import (
    DEFAULT_AGENT_START_PORT,
    DEFAULT_DISTRIBUTED_ADDRESS,
    HEARTBEAT_INTERVAL_S,
    RankTableAnswer,
    RankTableQuery,
    ServingError,
    decode,
    encode,
    normalize_address,
)
from zmserve.ranktable import RankTable
from zmserve.security import PLAINTEXT, Handshake, Peer, Security, send_unless_refused
from zmserve.supervision import die_with_parent, reap
from zmserve.transport import HeartbeatClock, new_socket

log = get_logger("launcher")
CRASH_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
SUPERVISE_INTERVAL_S = 0.1
FROZEN_LIMIT_S = 3.0


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
    previous_pid: int | None = None
    frozen_since: float | None = None


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
        pin_cpus: bool = False,
        security: Security = PLAINTEXT,
    ) -> None:
        if not model_files:
            raise LauncherError("no model files given: one agent runs per model file")
        if group_config_files and len(group_config_files) != len(model_files):
            raise LauncherError(f"{len(model_files)} model files but {len(group_config_files)} group config files")
        for path in model_files:
            if not Path(path).is_file():
                raise LauncherError(f"model file {path} does not exist")
        self.worker_address = normalize_address(distributed_address)
        self.model_files = list(model_files)
        self.group_config_files = list(group_config_files) if group_config_files else None
        self.agent_start_port = agent_start_port
        self.agent_ip = agent_ip
        self.rank_start = rank_start
        self.heartbeat_interval = heartbeat_interval
        self.pin_cpus = pin_cpus
        self.security = security
        self.agents: list[AgentProcess] = []
        # stop() runs in signal handlers, so it must take no lock the interrupted loop may hold (Event.set
        # would): it sets a flag and writes to a self-pipe the loop selects on.
        self.stop_requested = False
        self._wakeup_read, self._wakeup_write = os.pipe()
        self.failure: str | None = None

    def command(self, agent: AgentProcess) -> list[str]:
        settings = AgentSettings(
            worker=self.worker_address, rank=agent.rank, model_file=str(agent.model_file),
            publish_address=agent.publish_address, host=self.agent_ip or "127.0.0.1",
            group_config_file=str(agent.group_config_file) if agent.group_config_file is not None else None,
            replaces_pid=agent.previous_pid, heartbeat_interval=self.heartbeat_interval or HEARTBEAT_INTERVAL_S,
            **self.agent_keys(),
        )
        return [sys.executable, "-m", "services.agent.agent", settings.to_argument()]

    def agent_keys(self) -> dict[str, str]:
        """The key files an agent reads (their paths, not the keys: the command line is visible to others)."""
        keys = {}
        if self.security.client(Peer.WORKER) is not None:
            keys = {"secret_key": str(self.security.secret_key_file),
                    "worker_key": str(self.security.server_key_files[Peer.WORKER])}
        if self.security.collective_tls is not None:
            keys["collective_tls"] = str(self.security.collective_tls.folder)
        return keys

    def assign_ranks(self) -> bool:
        """Ranks of this machine's agents: `rank_start` + position, or this machine's entries in the worker's
        rank table. Returns False if stopped while waiting for the worker."""
        table, rank_size = None, None
        if self.rank_start is None:
            answer = self.ask_worker_for_rank_table()
            if answer is None:
                return False
            table, rank_size = answer
        if table is not None:
            document = RankTable.parse(table, rank_size, "the worker's rank table")
            servers = sorted({e.server_id for e in document.entries.values()})
            server = self.agent_ip or (servers[0] if len(servers) == 1 else None)
            if server is None:
                raise LauncherError(f"the rank table lists servers {servers}: give --agent-ip to pick this one")
            ranks = document.ranks_of_server(server)
            if len(ranks) != len(self.model_files):
                raise LauncherError(f"the rank table gives server {server} ranks {ranks}, but "
                                    f"{len(self.model_files)} model files were given")
        else:
            ranks = [(self.rank_start or 0) + i for i in range(len(self.model_files))]
        host = self.agent_ip or "127.0.0.1"
        self.agents = [
            AgentProcess(
                rank=rank,
                model_file=Path(self.model_files[i]),
                group_config_file=Path(self.group_config_files[i]) if self.group_config_files else None,
                publish_address=f"tcp://{host}:{self.agent_start_port + i}",
            )
            for i, rank in enumerate(ranks)
        ]
        return True

    def ask_worker_for_rank_table(self) -> tuple[dict | None, int] | None:
        """Wait (startup order is free) until the worker answers with its rank table, or stop is requested."""
        context = zmq.Context.instance()
        curve = self.security.client(Peer.WORKER)
        sock = new_socket(context, zmq.DEALER, curve=dataclasses.replace(curve, watch=False) if curve else None)
        handshake = Handshake(sock, curve is not None)
        sock.connect(self.worker_address)
        waiting = HeartbeatClock(5.0)
        try:
            while not self.stop_requested:
                refusal = handshake.read()
                if refusal is None and waiting.due():
                    log.info("asking_worker_for_rank_table", worker=self.worker_address)
                    refusal = send_unless_refused(sock, [encode(RankTableQuery())], handshake)
                if refusal is not None:
                    raise LauncherError(f"the worker at {self.worker_address} refused this launcher: "
                                        f"{refusal.value} (docs/SECURITY.md)")
                if sock.poll(100):
                    try:
                        answer = decode(sock.recv(), RankTableAnswer)
                    except ServingError as error:
                        raise LauncherError(f"the worker at {self.worker_address} answered the rank-table "
                                            f"query with something else: {error.message}") from None
                    return answer.table, answer.rank_size
            return None
        finally:
            handshake.close(sock)
            sock.close()

    def start(self, agent: AgentProcess) -> None:
        env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
        cpu = self.cpu_for(agent)
        agent.process = subprocess.Popen(self.command(agent), env=env,
                                         preexec_fn=lambda: self.prepare_child(cpu))
        log.info("agent_started", agent_rank=agent.rank, pid=agent.process.pid, restarts=agent.restarts, cpu=cpu)

    def cpu_for(self, agent: AgentProcess) -> int | None:
        """With pinning, agent i of this machine runs on core i mod (cores this launcher may use)."""
        if not self.pin_cpus:
            return None
        cores = sorted(os.sched_getaffinity(0))
        return cores[self.agents.index(agent) % len(cores)]

    @staticmethod
    def prepare_child(cpu: int | None) -> None:
        die_with_parent()
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    def run(self) -> int:
        """Start every agent and supervise until stopped; returns the exit code for the CLI."""
        if not self.assign_ranks():
            return 0
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
                self.check_not_frozen(agent, now)
                continue
            agent.previous_pid, agent.process = agent.process.pid, None
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

    def check_not_frozen(self, agent: AgentProcess, now: float) -> None:
        """A stopped agent (SIGSTOP, state T) cannot act on the worker's shutdown: after FROZEN_LIMIT_S, kill
        it so the next supervise() restarts it."""
        assert agent.process is not None
        try:
            state = Path(f"/proc/{agent.process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state not in ("T", "t"):
            agent.frozen_since = None
        elif agent.frozen_since is None:
            agent.frozen_since = now
        elif now - agent.frozen_since > FROZEN_LIMIT_S:
            log.warning("agent_frozen", agent_rank=agent.rank, pid=agent.process.pid, seconds=FROZEN_LIMIT_S)
            agent.process.kill()
            agent.frozen_since = None

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
