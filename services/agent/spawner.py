"""Starting an agent process (or a standby): in its memory cgroup when the launcher has a limit, on its core when it
pins, in its own process group, holding its status pipe and reason pipe; and freeing those parts when it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from zmserve.logs import get_logger
from zmserve.supervision import die_with_parent
from zmserve_services.agent.memory_limit import (
    CGROUP_PREFIX,
    AgentCgroup,
    MemoryLimitError,
    find_hierarchy,
    format_size,
)
from zmserve_services.agent.processes import AgentExit, AgentProcess, LauncherError
from zmserve_services.agent.status_pipe import StatusPipe

log = get_logger("launcher")


class AgentSpawner:
    """The launcher's process settings: `pin_cpus` (agent i on core i mod cores) and `memory_limit` (a cgroup per
    agent process, checked once at start so that a machine without cgroups fails the command in one line)."""

    def __init__(self, pin_cpus: bool = False, memory_limit: int | None = None) -> None:
        self.pin_cpus = pin_cpus
        self.memory_limit = memory_limit
        self.cgroups = None
        self.cgroups_created = 0
        if memory_limit is not None:
            try:
                self.cgroups = find_hierarchy()
                self.cgroups.create(f"{CGROUP_PREFIX}{os.getpid()}-probe", memory_limit).remove()
            except (MemoryLimitError, OSError) as error:
                raise LauncherError(f"cannot apply --memory-limit: {error}") from None

    def describe(self) -> str | None:
        """The cgroup hierarchy agents run in, for the launcher's first line (None without a limit)."""
        return f"v{self.cgroups.version} {self.cgroups.parent}" if self.cgroups else None

    def remove_stale(self) -> None:
        """Cgroups a launcher of this machine left behind (it was SIGKILLed)."""
        if self.cgroups is not None and self.memory_limit is not None:
            for path in self.cgroups.remove_stale():
                log.info("stale_cgroup_removed", path=str(path))

    def spawn(self, position: int, arguments: list[str], status: StatusPipe, cgroup: AgentCgroup | None,
              reason_fd: int, **popen: object) -> subprocess.Popen:
        """An agent process (or a standby) in its cgroup, on its core, in its own process group, holding the child
        end of `status` and the only write end of its reason pipe (its exit ends the pipe)."""
        env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
        cpu = self.cpu_for(position)
        try:
            return subprocess.Popen([sys.executable, "-m", "zmserve_services.agent.agent", *arguments], env=env,
                                    pass_fds=(status.child_fd, reason_fd), process_group=0,
                                    preexec_fn=lambda: self.prepare_child(cpu, cgroup),
                                    **popen)  # type: ignore[call-overload]
        finally:
            status.spawned()
            os.close(reason_fd)

    def new_cgroup(self, agent: AgentProcess) -> AgentCgroup | None:
        if self.cgroups is None or self.memory_limit is None:
            return None
        self.cgroups_created += 1
        name = f"{CGROUP_PREFIX}{os.getpid()}-rank{agent.rank}-{self.cgroups_created}"
        try:
            return self.cgroups.create(name, self.memory_limit)
        except OSError as error:
            raise LauncherError(f"cannot create the memory cgroup of rank {agent.rank}: {error}") from None

    def cpu_for(self, position: int) -> int | None:
        """With pinning, agent i of this machine runs on core i mod (cores this launcher may use)."""
        if not self.pin_cpus:
            return None
        cores = sorted(os.sched_getaffinity(0))
        return cores[position % len(cores)]

    def memory(self) -> str | None:
        """The limit per agent, for log lines."""
        return format_size(self.memory_limit) if self.memory_limit else None

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
        release(agent)
        return AgentExit(code, oom_killed, loaded, peak)


def release(agent: AgentProcess) -> None:
    release_parts(agent.status, agent.cgroup)
    agent.status, agent.cgroup = None, None


def release_parts(status: StatusPipe | None, cgroup: AgentCgroup | None) -> None:
    if status is not None:
        status.close()
    if cgroup is not None:
        try:
            cgroup.remove()
        except OSError as error:
            log.warning("cgroup_not_removed", path=str(cgroup.path), error=str(error))
