"""The agent launcher (`zmserve agent`, `startup_agents`): one agent process per model file on this machine.

It supervises them: an agent that exits to be restarted (the worker re-forms its group, or the worker went
away) or that crashed is started again, with backoff for crashes; an agent whose rank the worker rejected for
good is not, and the launcher stops with the worker's reason (each agent writes it into a pipe the launcher
reads, `reason_fd`) as its error. SIGINT/SIGTERM stop every agent and reap it, after telling the worker
(AGENT_STOPPED) so that it logs a stop, not lost agents. Agents run in their own process group: a Ctrl-C in the
terminal reaches the launcher, which stops them in that order.

With a memory limit, each agent runs in a memory cgroup of its own (services/agent/memory_limit.py). The launcher
learns why an agent died (the OOM killer at the limit, a signal, an exit code) and tells the replacement, which
tells the worker; an agent the OOM killer ends OOM_LOADING_ATTEMPTS times before it has loaded its shard will
never fit, so the launcher stops with that reason instead of restarting it forever.

Two things make a restart prompt:
  - standby agents (services/agent/standbys.py);
  - its own link to the worker (services/agent/launcher_link.py): the worker names the agents it shut down, and
    the launcher ends those that did not exit within the grace (an agent inside MindSpore's init() holds the GIL
    and cannot act on the shutdown), and every agent once the worker has gone silent.

The parts, one concern each: which ranks this machine holds (services/agent/ranks.py), what the launcher knows of
each rank's process (services/agent/processes.py), starting one in its cgroup and on its core
(services/agent/spawner.py), standbys (services/agent/standbys.py), what an exit leads to: restart, backoff or
give up (services/agent/exits.py). This module runs them: start, supervise, shut down.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import zmq

from zmserve.endpoints import DEFAULT_AGENT_START_PORT, DEFAULT_DISTRIBUTED_ADDRESS, normalize_address
from zmserve.logs import get_logger
from zmserve.protocol import SHUTDOWN_GRACE_S, AgentsShutDown, AgentStopped, LauncherHello
from zmserve.security import PLAINTEXT, Peer, Security
from zmserve.supervision import reap
from zmserve.transport import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS
from zmserve_services.agent.agent import EXIT_RESTART, AgentSettings
from zmserve_services.agent.exits import after_exit, model_bytes
from zmserve_services.agent.launcher_link import LauncherLink
from zmserve_services.agent.memory_limit import format_size
from zmserve_services.agent.processes import AgentProcess, LauncherError, read_all
from zmserve_services.agent.ranks import Layout, assign_ranks, unwatched
from zmserve_services.agent.spawner import AgentSpawner, release
from zmserve_services.agent.standbys import Standbys
from zmserve_services.agent.status_pipe import StatusPipe
from zmserve_services.agent.subgraphs import FILE_SEPARATOR, subgraph_files

__all__ = ["AgentLauncher", "LauncherError"]

log = get_logger("launcher")
SUPERVISE_INTERVAL_S = 0.1
FROZEN_LIMIT_S = 3.0


class AgentLauncher:
    def __init__(
        self,
        distributed_address: str = DEFAULT_DISTRIBUTED_ADDRESS,
        model_files: list[str] | list[list[str]] | tuple[str, ...] = (),
        group_config_files: list[str] | tuple[str, ...] | None = None,
        agent_start_port: int = DEFAULT_AGENT_START_PORT,
        agent_ip: str | None = None,
        rank_start: int | None = None,
        heartbeat_interval: float | None = None,
        pin_cpus: bool = False,
        memory_limit: int | None = None,
        standby: bool = True,
        security: Security = PLAINTEXT,
    ) -> None:
        if not model_files:
            raise LauncherError("no model files given: one agent runs per model file")
        if group_config_files and len(group_config_files) != len(model_files):
            raise LauncherError(f"{len(model_files)} model files but {len(group_config_files)} group config files")
        # a rank's subgraph files come as a list, or joined with ";" (MindSpore Serving's multi-subgraph models)
        model_files = [FILE_SEPARATOR.join(map(str, f)) if isinstance(f, list | tuple) else str(f)
                       for f in model_files]
        for entry in model_files:
            for path in subgraph_files(entry) or [Path(entry)]:
                if not path.is_file():
                    raise LauncherError(f"model file {path} does not exist")
        self.worker_address = normalize_address(distributed_address)
        self.layout = Layout(list(model_files), list(group_config_files) if group_config_files else None,
                             agent_start_port, agent_ip, rank_start)
        self.agent_ip = agent_ip
        self.heartbeat_interval = heartbeat_interval
        self.memory_limit = memory_limit
        self.security = security
        self.link: LauncherLink | None = None
        self.spawner = AgentSpawner(pin_cpus, memory_limit)
        self.standbys = Standbys(standby, self.spawner, self.settings)
        self.agents: list[AgentProcess] = []
        # stop() runs in signal handlers, so it must take no lock the interrupted loop may hold (Event.set
        # would): it sets a flag and writes to a self-pipe the loop selects on.
        self.stop_requested = False
        self._wakeup_read, self._wakeup_write = os.pipe()
        self.failure: str | None = None

    def settings(self, agent: AgentProcess, status: StatusPipe | None, reason_fd: int | None,
                 restart: bool = True) -> AgentSettings:
        """What agent process `agent` is told: its rank and files, and on a restart whom it replaces and why."""
        return AgentSettings(
            worker=self.worker_address, rank=agent.rank, model_file=str(agent.model_file),
            publish_address=agent.publish_address, host=self.agent_ip or "127.0.0.1",
            group_config_file=str(agent.group_config_file) if agent.group_config_file is not None else None,
            replaces_pid=agent.previous_pid if restart else None,
            previous_exit=agent.previous_exit if restart else None,
            status_fd=status.child_fd if status is not None else None,
            heartbeat_interval=self.heartbeat_interval or HEARTBEAT_INTERVAL_S, reason_fd=reason_fd,
            **self.agent_keys(),
        )

    def agent_keys(self) -> dict[str, str]:
        """The key files an agent reads (their paths, not the keys: the command line is visible to others)."""
        keys = {}
        if self.security.client(Peer.WORKER) is not None:
            keys = {"secret_key": str(self.security.secret_key_file),
                    "worker_key": str(self.security.server_key_files[Peer.WORKER])}
        if self.security.collective_tls is not None:
            keys["collective_tls"] = str(self.security.collective_tls.folder)
        return keys

    def start(self, agent: AgentProcess) -> None:
        """Run the next process of this rank: its standby if it has one, else a new process."""
        if self.standbys.activate(agent):
            return
        position = self.agents.index(agent)
        cgroup, status = self.spawner.new_cgroup(agent), StatusPipe()
        agent.cgroup, agent.status, agent.loaded = cgroup, status, False
        agent.reasons, reason_fd = os.pipe()
        try:
            agent.process = self.spawner.spawn(position, [self.settings(agent, status, reason_fd).to_argument()],
                                               status, cgroup, reason_fd)
        except BaseException:
            self.read_reason(agent)
            release(agent)
            raise
        agent.started_at = time.monotonic()
        log.debug("agent_started", agent_rank=agent.rank, pid=agent.process.pid, restarts=agent.restarts,
                  cpu=self.spawner.cpu_for(position), memory_limit=self.spawner.memory())

    @staticmethod
    def read_reason(agent: AgentProcess) -> str:
        """What the exited agent wrote into its pipe (empty if nothing), and close the pipe."""
        if agent.reasons is None:
            return ""
        reason = read_all(agent.reasons)
        agent.reasons = None
        return reason

    def run(self) -> int:
        """Start every agent and supervise until stopped; returns the exit code for the CLI (0), or raises
        LauncherError when the agents cannot serve (the worker refused a shard for good, or a shard cannot load
        under the memory limit)."""
        try:
            agents = assign_ranks(self.layout, self.worker_address, self.security, lambda: self.stop_requested)
            if agents is None:
                return 0
            self.agents = agents
            log.info("launcher_started", worker=self.worker_address, ranks=[a.rank for a in self.agents],
                     memory_limit=self.spawner.memory(), cgroup=self.spawner.describe())
            self.spawner.remove_stale()
            if self.memory_limit is not None and self.spawner.cgroups is not None:
                for agent in self.agents:
                    if model_bytes(agent.model_file) > self.memory_limit:
                        log.warning("shard_larger_than_memory_limit", agent_rank=agent.rank,
                                    shard=format_size(model_bytes(agent.model_file)),
                                    memory_limit=format_size(self.memory_limit))
            for agent in self.agents:
                self.start(agent)
            self.link = LauncherLink(zmq.Context.instance(), self.worker_address,
                                     LauncherHello(host=self.agent_ip or "127.0.0.1", pid=os.getpid(),
                                                   ranks=[a.rank for a in self.agents]),
                                     self.heartbeat_interval or HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS,
                                     curve=unwatched(self.security.client(Peer.WORKER)))
            while not self.stop_requested:
                select.select([self._wakeup_read], [], [], SUPERVISE_INTERVAL_S)
                if not self.stop_requested:
                    self.supervise()
        finally:
            self.shutdown()
        if self.failure:
            raise LauncherError(self.failure)
        return 0

    def supervise(self) -> None:
        now = time.monotonic()
        if self.link is not None:
            orders, worker_lost = self.link.exchange(now)
            for order in orders:
                self.enforce(order, now)
            if worker_lost:  # agents that heard the worker: a process started since has nothing to wait for
                for agent in self.agents:
                    if agent.process is not None and agent.started_at <= self.link.worker.last_heard:
                        self.end_later(agent, agent.process.pid, now + SHUTDOWN_GRACE_S, "the worker went silent")
        for agent in self.agents:
            if agent.process is None:
                if now >= agent.restart_at:
                    agent.restarts += 1
                    self.start(agent)
                continue
            code = agent.process.poll()
            if code is None:
                if not agent.loaded and agent.status is not None and agent.status.loaded():
                    agent.loaded, agent.oom_kills_loading = True, 0
                self.check_not_frozen(agent, now)
                self.check_ended_in_time(agent, now)
                continue
            ended = self.spawner.ended(agent, code)
            reason = self.read_reason(agent)
            pid = agent.process.pid
            agent.previous_pid, agent.process, agent.end_at = pid, None, None
            if self.link is not None and not agent.ended_by_launcher and code != EXIT_RESTART:
                self.link.agent_exited(agent.rank, pid, ended.describe(self.memory_limit))
            failure = after_exit(agent, ended, reason, now, self.memory_limit)
            if failure is not None:
                self.failure = failure
                self.stop()
                return
        if not self.stop_requested:
            self.standbys.keep(self.agents)

    def enforce(self, order: AgentsShutDown, now: float) -> None:
        """The worker shut these agents down: any of ours still running after the grace is ended."""
        for stopped in order.agents:
            for agent in self.agents:
                if agent.rank == stopped.rank:
                    self.end_later(agent, stopped.pid, now + order.grace_s,
                                   f"the worker shut it down ({order.reason}) and it did not exit within "
                                   f"{order.grace_s:g} s")

    @staticmethod
    def end_later(agent: AgentProcess, pid: int | None, at: float, why: str) -> None:
        """Mark the running process `pid` of this agent to be ended at `at` (not a later process of the rank)."""
        if agent.process is not None and agent.process.pid == pid and agent.process.poll() is None \
                and agent.end_at is None:
            agent.end_at, agent.end_why = at, why

    def check_ended_in_time(self, agent: AgentProcess, now: float) -> None:
        """An agent the worker shut down exits by itself within ~0.1 s, unless MindSpore's init() holds its GIL
        (or a long compile does): then the launcher ends it, and restarts it at once."""
        assert agent.process is not None
        if agent.end_at is not None and now >= agent.end_at:
            log.warning("agent_ended", agent_rank=agent.rank, pid=agent.process.pid, why=agent.end_why)
            agent.process.kill()
            agent.ended_by_launcher, agent.end_at = True, None

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

    def drain(self) -> None:
        """A launcher holds no requests: it stops (telling the worker first, `shutdown`)."""
        self.stop()

    def shutdown(self) -> None:
        self.tell_worker_stopping([a for a in self.agents if a.process is not None and a.process.poll() is None])
        running = [a.process for a in self.agents if a.process is not None]
        for process in running:
            if process.poll() is None:
                process.terminate()
        self.standbys.retire(self.agents)
        for process in running:
            reap(process, timeout=5.0)
        for agent in self.agents:
            self.read_reason(agent)
            if agent.cgroup is not None:
                peak = agent.cgroup.peak()
                log.info("agent_memory", agent_rank=agent.rank, memory_limit=format_size(agent.cgroup.limit),
                         peak_memory=format_size(peak) if peak is not None else None, peak_bytes=peak)
            release(agent)
            agent.process = None
        if self.link is not None:
            self.link.close()
        os.close(self._wakeup_read)
        os.close(self._wakeup_write)
        log.info("launcher_stopped")

    def tell_worker_stopping(self, agents: list[AgentProcess]) -> None:
        """The agents about to end stop on purpose: the worker logs that as a stop, not as lost agents (if the
        note cannot leave, the worker finds out from the missing heartbeats)."""
        if self.link is None or self.failure:
            return
        for agent in agents:
            assert agent.process is not None
            self.link.send(AgentStopped(rank=agent.rank, pid=agent.process.pid, reason="its launcher is stopping"))
