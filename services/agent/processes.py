"""What an agent launcher knows of each rank's process: its files and address, the process running now, its
standby, its restarts and how the last one ended. services/agent/launcher.py supervises these."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from zmserve.transport import is_loopback_host
from zmserve_services.agent.memory_limit import AgentCgroup, format_size
from zmserve_services.agent.status_pipe import StatusPipe


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
