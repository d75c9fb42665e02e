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
  - standby agents (`standby=True`, the default): once every agent has loaded, the launcher starts one more
    process per rank that imports MindSpore and waits (zmserve/standby.py); a restart hands it its settings, so
    the new agent registers at once instead of after its import (1-2 s idle, 15-20 s for eight on two cores);
  - its own link to the worker (services/agent/launcher_link.py): the worker names the agents it shut down, and
    the launcher ends those that did not exit within the grace (an agent inside MindSpore's init() holds the GIL
    and cannot act on the shutdown), and every agent once the worker has gone silent.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from services.agent.agent import EXIT_REJECTED, EXIT_RESTART, EXIT_STOPPED, AgentSettings
from services.agent.launcher_link import LauncherLink
from services.agent.memory_limit import CGROUP_PREFIX, AgentCgroup, MemoryLimitError, find_hierarchy, format_size
from services.agent.status_pipe import StatusPipe
from zmserve.logs import get_logger
from zmserve.protocol import (
    DEFAULT_AGENT_START_PORT,
    DEFAULT_DISTRIBUTED_ADDRESS,
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    SHUTDOWN_GRACE_S,
    AgentsShutDown,
    AgentStopped,
    LauncherHello,
    RankTableAnswer,
    RankTableQuery,
    ServingError,
    decode,
    encode,
    normalize_address,
)
from zmserve.ranktable import RankTable
from zmserve.security import PLAINTEXT, Curve, Handshake, Peer, Security, send_unless_refused
from zmserve.standby import STANDBY_FLAG, activate, retire
from zmserve.streamed_export import shard_bytes
from zmserve.supervision import die_with_parent, reap
from zmserve.transport import HeartbeatClock, is_loopback_host, new_socket

log = get_logger("launcher")
CRASH_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
"""Restart delay after the 1st, 2nd, ... crash of a rank in a row: the first costs one supervision tick (every agent
restarts with it anyway), a crash loop slows down."""
SUPERVISE_INTERVAL_S = 0.1
FROZEN_LIMIT_S = 3.0
OOM_LOADING_ATTEMPTS = 3
"""OOM kills before an agent has loaded its shard, in a row, after which the launcher gives up on it."""
STANDBY_FAILURES = 3
"""Standby agents that die before they are used, in a row, after which the launcher stops starting them."""


def publish_address(host: str, port: int) -> str:
    """Where an agent publishes its stage's output to the next stage: TCP on `host`:`port`, or on loopback (every
    stage on this machine) a Unix socket named after the port, as fast as TCP for small calls and faster for big
    ones (docs/BENCHMARKS.md); two launchers on one machine need different start ports either way."""
    if is_loopback_host(host):
        return f"ipc://@zmserve-agent-publish-{port}"
    return f"tcp://{host}:{port}"


class LauncherError(RuntimeError):
    pass


@dataclass
class Standby:
    """A process waiting to become this rank's next agent, with MindSpore imported (or importing)."""

    process: subprocess.Popen
    status: StatusPipe
    cgroup: AgentCgroup | None
    reasons: int
    reason_fd: int


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
    previous_exit: str | None = None
    """Why the previous process of this rank died (None after a clean exit): told to the next one."""
    cgroup: AgentCgroup | None = None
    status: StatusPipe | None = None
    loaded: bool = False
    oom_kills_loading: int = 0
    reasons: int | None = None
    """The read end of the pipe on which the running process says why it was rejected for good."""
    standby: Standby | None = None
    end_at: float | None = None
    """When the launcher ends the running process, which the worker shut down (or left for dead) and which has not
    exited by itself."""
    end_why: str = ""
    ended_by_launcher: bool = False
    started_at: float = 0.0
    """When the running process was started (or a standby activated): only a process that could have heard the
    worker can be stuck waiting for it."""


@dataclass(frozen=True)
class AgentExit:
    """How an agent process ended, as far as its launcher can tell."""

    code: int
    oom_killed: bool
    loaded: bool
    peak: int | None

    def describe(self, limit: int | None) -> str:
        if self.oom_killed and limit is not None:
            when = "serving" if self.loaded else "loading its shard"
            return f"killed by the OOM killer at its memory limit of {format_size(limit)} while {when}"
        if self.code < 0:
            return f"killed by signal {signal.Signals(-self.code).name}"
        return f"exited with code {self.code}"


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
        memory_limit: int | None = None,
        standby: bool = True,
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
        self.memory_limit = memory_limit
        self.security = security
        self.standby = standby
        self.standby_failures = 0
        self.link: LauncherLink | None = None
        self.cgroups = None
        self.cgroups_created = 0
        if memory_limit is not None:
            try:
                self.cgroups = find_hierarchy()
                self.cgroups.create(f"{CGROUP_PREFIX}{os.getpid()}-probe", memory_limit).remove()
            except (MemoryLimitError, OSError) as error:
                raise LauncherError(f"cannot apply --memory-limit: {error}") from None
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
                publish_address=publish_address(host, self.agent_start_port + i),
            )
            for i, rank in enumerate(ranks)
        ]
        return True

    def ask_worker_for_rank_table(self) -> tuple[dict | None, int] | None:
        """Wait (startup order is free) until the worker answers with its rank table, or stop is requested."""
        context = zmq.Context.instance()
        curve = self.security.client(Peer.WORKER)
        sock = new_socket(context, zmq.DEALER, curve=unwatched(curve))
        handshake = Handshake(sock, curve is not None)
        sock.connect(self.worker_address)
        waiting = HeartbeatClock(5.0)
        asked = False
        try:
            while not self.stop_requested:
                refusal = handshake.read()
                if refusal is None and waiting.due():
                    (log.info if asked else log.debug)("asking_worker_for_rank_table", worker=self.worker_address)
                    refusal = send_unless_refused(sock, [encode(RankTableQuery())], handshake)
                    asked = True
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
        """Run the next process of this rank: its standby if it has one, else a new process."""
        standby, agent.standby = agent.standby, None
        if standby is not None:
            agent.process, agent.status, agent.cgroup, agent.loaded = (standby.process, standby.status,
                                                                       standby.cgroup, False)
            agent.reasons = standby.reasons
            if activate(standby.process, self.settings(agent, standby.status, standby.reason_fd).to_argument()):
                self.standby_failures, agent.started_at = 0, time.monotonic()
                log.info("standby_used", agent_rank=agent.rank, pid=standby.process.pid, restarts=agent.restarts)
                return
            log.warning("standby_lost", agent_rank=agent.rank, pid=standby.process.pid)
            reap(standby.process, timeout=1.0)
            self.read_reason(agent)
            self.release(agent)
            agent.process = None
        cgroup, status = self.new_cgroup(agent), StatusPipe()
        agent.cgroup, agent.status, agent.loaded = cgroup, status, False
        agent.reasons, reason_fd = os.pipe()
        try:
            agent.process = self.spawn(agent, [self.settings(agent, status, reason_fd).to_argument()], status,
                                       cgroup, reason_fd)
        except BaseException:
            self.read_reason(agent)
            self.release(agent)
            raise
        agent.started_at = time.monotonic()
        log.debug("agent_started", agent_rank=agent.rank, pid=agent.process.pid, restarts=agent.restarts,
                 cpu=self.cpu_for(agent), memory_limit=format_size(self.memory_limit) if self.memory_limit else None)

    def spawn(self, agent: AgentProcess, arguments: list[str], status: StatusPipe, cgroup: AgentCgroup | None,
              reason_fd: int, **popen: object) -> subprocess.Popen:
        """An agent process (or a standby) in its cgroup, on its core, in its own process group, holding the child
        end of `status` and the only write end of its reason pipe (its exit ends the pipe)."""
        env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
        cpu = self.cpu_for(agent)
        try:
            return subprocess.Popen([sys.executable, "-m", "services.agent.agent", *arguments], env=env,
                                    pass_fds=(status.child_fd, reason_fd), process_group=0,
                                    preexec_fn=lambda: self.prepare_child(cpu, cgroup),
                                    **popen)  # type: ignore[call-overload]
        finally:
            status.spawned()
            os.close(reason_fd)

    @staticmethod
    def read_reason(agent: AgentProcess) -> str:
        """What the exited agent wrote into its pipe (empty if nothing), and close the pipe."""
        if agent.reasons is None:
            return ""
        reason = read_all(agent.reasons)
        agent.reasons = None
        return reason

    def new_cgroup(self, agent: AgentProcess) -> AgentCgroup | None:
        if self.cgroups is None or self.memory_limit is None:
            return None
        self.cgroups_created += 1
        name = f"{CGROUP_PREFIX}{os.getpid()}-rank{agent.rank}-{self.cgroups_created}"
        try:
            return self.cgroups.create(name, self.memory_limit)
        except OSError as error:
            raise LauncherError(f"cannot create the memory cgroup of rank {agent.rank}: {error}") from None

    def keep_standbys(self) -> None:
        """Once every agent has loaded (so that their imports never compete with a forming group for the CPU),
        each rank gets a standby; a standby that died is dropped, and after STANDBY_FAILURES in a row the launcher
        stops starting them."""
        if not self.standby or self.stop_requested:
            return
        for agent in self.agents:
            standby = agent.standby
            if standby is not None and standby.process.poll() is not None:
                agent.standby = None
                read_all(standby.reasons)
                self.release_parts(standby.status, standby.cgroup)
                self.standby_failures += 1
                log.warning("standby_died", agent_rank=agent.rank, pid=standby.process.pid,
                            code=standby.process.returncode, failures=self.standby_failures)
                if self.standby_failures >= STANDBY_FAILURES:
                    self.standby = False
                    log.warning("standby_disabled", why=f"{STANDBY_FAILURES} standby agents died before use")
                    return
        if not all(agent.process is not None and agent.loaded for agent in self.agents):
            return
        for agent in self.agents:
            if agent.standby is None:
                cgroup, status = None, StatusPipe()
                reasons, reason_fd = os.pipe()
                try:
                    cgroup = self.new_cgroup(agent)
                    settings = self.settings(agent, status, reason_fd, restart=False)
                    process = self.spawn(agent, [STANDBY_FLAG, settings.to_argument()], status, cgroup, reason_fd,
                                         stdin=subprocess.PIPE)
                except (LauncherError, OSError) as error:  # a standby is an optimisation: never worth a failure
                    read_all(reasons)
                    self.release_parts(status, cgroup)
                    self.standby = False
                    log.warning("standby_disabled", why=f"a standby agent could not start: {error}")
                    return
                agent.standby = Standby(process, status, cgroup, reasons, reason_fd)
                log.info("standby_started", agent_rank=agent.rank, pid=process.pid)

    def cpu_for(self, agent: AgentProcess) -> int | None:
        """With pinning, agent i of this machine runs on core i mod (cores this launcher may use)."""
        if not self.pin_cpus:
            return None
        cores = sorted(os.sched_getaffinity(0))
        return cores[self.agents.index(agent) % len(cores)]

    @staticmethod
    def prepare_child(cpu: int | None, cgroup: AgentCgroup | None) -> None:
        die_with_parent()
        if cgroup is not None:
            cgroup.join()
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    def ended(self, agent: AgentProcess, code: int) -> AgentExit:
        """How the agent's process ended; frees its cgroup and status pipe."""
        loaded = agent.loaded or (agent.status is not None and agent.status.loaded())
        oom_killed, peak = False, None
        if agent.cgroup is not None:
            oom_killed = code == -signal.SIGKILL and agent.cgroup.oom_kills() > 0
            peak = agent.cgroup.peak()
        self.release(agent)
        return AgentExit(code, oom_killed, loaded, peak)

    @classmethod
    def release(cls, agent: AgentProcess) -> None:
        cls.release_parts(agent.status, agent.cgroup)
        agent.status, agent.cgroup = None, None

    @staticmethod
    def release_parts(status: StatusPipe | None, cgroup: AgentCgroup | None) -> None:
        if status is not None:
            status.close()
        if cgroup is not None:
            try:
                cgroup.remove()
            except OSError as error:
                log.warning("cgroup_not_removed", path=str(cgroup.path), error=str(error))

    def run(self) -> int:
        """Start every agent and supervise until stopped; returns the exit code for the CLI (0), or raises
        LauncherError when the agents cannot serve (the worker refused a shard for good, or a shard cannot load
        under the memory limit)."""
        try:
            if not self.assign_ranks():
                return 0
            log.info("launcher_started", worker=self.worker_address, ranks=[a.rank for a in self.agents],
                     memory_limit=format_size(self.memory_limit) if self.memory_limit else None,
                     cgroup=f"v{self.cgroups.version} {self.cgroups.parent}" if self.cgroups else None)
            if self.cgroups is not None and self.memory_limit is not None:
                for path in self.cgroups.remove_stale():
                    log.info("stale_cgroup_removed", path=str(path))
                for agent in self.agents:
                    if shard_bytes(agent.model_file) > self.memory_limit:
                        log.warning("shard_larger_than_memory_limit", agent_rank=agent.rank,
                                    shard=format_size(shard_bytes(agent.model_file)),
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
            ended = self.ended(agent, code)
            reason = self.read_reason(agent)
            pid = agent.process.pid
            agent.previous_pid, agent.process, agent.end_at = pid, None, None
            if self.link is not None and not agent.ended_by_launcher and code != EXIT_RESTART:
                self.link.agent_exited(agent.rank, pid, ended.describe(self.memory_limit))
            if agent.ended_by_launcher:
                agent.ended_by_launcher = False
                agent.crashes, agent.restart_at, agent.previous_exit = 0, now, None
                log.info("agent_exited", agent_rank=agent.rank, code=code, action="restart", why=agent.end_why)
                continue
            if code == EXIT_REJECTED:
                self.failure = f"rank {agent.rank} cannot serve: {reason or 'its agent gave no reason'}"
                self.stop()
                return
            if code in (EXIT_RESTART, EXIT_STOPPED):
                agent.crashes = 0
                agent.restart_at = now
                agent.previous_exit = None
                log.debug("agent_exited", agent_rank=agent.rank, code=code, action="restart")
                continue
            agent.previous_exit = ended.describe(self.memory_limit)
            peak = format_size(ended.peak) if ended.peak is not None else None
            if ended.oom_killed and not ended.loaded:
                agent.oom_kills_loading += 1
                if agent.oom_kills_loading >= OOM_LOADING_ATTEMPTS:
                    self.failure = self.does_not_fit(agent)
                    log.error("agent_crashed", agent_rank=agent.rank, code=code, why=agent.previous_exit,
                              peak_memory=peak, action="give up")
                    self.stop()
                    return
            backoff = CRASH_BACKOFF_S[min(agent.crashes, len(CRASH_BACKOFF_S) - 1)]
            agent.crashes += 1
            agent.restart_at = now + backoff
            log.warning("agent_crashed", agent_rank=agent.rank, code=code, why=agent.previous_exit,
                        peak_memory=peak, restart_in=backoff)
        self.keep_standbys()

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

    def does_not_fit(self, agent: AgentProcess) -> str:
        """The one-line reason the launcher gives up on a rank whose shard cannot load under the limit."""
        assert self.memory_limit is not None
        return (f"rank {agent.rank} was killed by the OOM killer {agent.oom_kills_loading} times while loading its "
                f"shard ({format_size(shard_bytes(agent.model_file))}, {agent.model_file}): it does not fit the "
                f"memory limit of {format_size(self.memory_limit)} per agent; shard the model over more ranks or "
                f"raise --memory-limit")

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
        self.tell_worker_stopping([a for a in self.agents if a.process is not None and a.process.poll() is None])
        running = [a.process for a in self.agents if a.process is not None]
        for process in running:
            if process.poll() is None:
                process.terminate()
        for agent in self.agents:
            if agent.standby is not None:
                retire(agent.standby.process)
                read_all(agent.standby.reasons)
                self.release_parts(agent.standby.status, agent.standby.cgroup)
                agent.standby = None
        for process in running:
            reap(process, timeout=5.0)
        for agent in self.agents:
            self.read_reason(agent)
            if agent.cgroup is not None:
                peak = agent.cgroup.peak()
                log.info("agent_memory", agent_rank=agent.rank, memory_limit=format_size(agent.cgroup.limit),
                         peak_memory=format_size(peak) if peak is not None else None, peak_bytes=peak)
            self.release(agent)
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


def unwatched(curve: Curve | None) -> Curve | None:
    """CURVE settings without a handshake monitor (a refusal shows in the rank-table query or the agents')."""
    return dataclasses.replace(curve, watch=False) if curve is not None else None


def read_all(fd: int) -> str:
    """Everything left in pipe `fd` (its writer has exited or never wrote), closing it."""
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    except OSError:
        pass
    os.close(fd)
    return b"".join(chunks).decode(errors="replace").strip()
