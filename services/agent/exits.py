"""What the launcher does when an agent process exits: restart it at once (asked to, or stopped), after a
backoff (it crashed), or not at all: the worker rejected its rank for good, or the OOM killer ended it
OOM_LOADING_ATTEMPTS times in a row before it loaded its shard, so it will never fit its memory limit."""

from __future__ import annotations

from pathlib import Path

from zmserve.logs import get_logger
from zmserve.streamed_export import shard_bytes
from zmserve_services.agent.agent import EXIT_REJECTED, EXIT_RESTART, EXIT_STOPPED
from zmserve_services.agent.memory_limit import format_size
from zmserve_services.agent.processes import AgentExit, AgentProcess
from zmserve_services.agent.subgraphs import subgraph_files

log = get_logger("launcher")

CRASH_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
"""Restart delay after the 1st, 2nd, ... crash of a rank in a row: the first costs one supervision tick (every agent
restarts with it anyway), a crash loop slows down."""
OOM_LOADING_ATTEMPTS = 3
"""OOM kills before an agent has loaded its shard, in a row, after which the launcher gives up on it."""


def after_exit(agent: AgentProcess, ended: AgentExit, reason: str, now: float, memory_limit: int | None) -> str | None:
    """Schedule the rank's next process (agent.restart_at); or the failure that stops the launcher instead."""
    code = ended.code
    if agent.ended_by_launcher:
        agent.ended_by_launcher = False
        agent.crashes, agent.restart_at, agent.previous_exit = 0, now, None
        log.info("agent_exited", agent_rank=agent.rank, code=code, action="restart", why=agent.end_why)
        return None
    if code == EXIT_REJECTED:
        return f"rank {agent.rank} cannot serve: {reason or 'its agent gave no reason'}"
    if code in (EXIT_RESTART, EXIT_STOPPED):
        agent.crashes = 0
        agent.restart_at = now
        agent.previous_exit = None
        log.debug("agent_exited", agent_rank=agent.rank, code=code, action="restart")
        return None
    agent.previous_exit = ended.describe(memory_limit)
    peak = format_size(ended.peak) if ended.peak is not None else None
    if ended.oom_killed and not ended.loaded:
        agent.oom_kills_loading += 1
        if agent.oom_kills_loading >= OOM_LOADING_ATTEMPTS:
            log.error("agent_crashed", agent_rank=agent.rank, code=code, why=agent.previous_exit,
                      peak_memory=peak, action="give up")
            assert memory_limit is not None
            return does_not_fit(agent, memory_limit)
    backoff = CRASH_BACKOFF_S[min(agent.crashes, len(CRASH_BACKOFF_S) - 1)]
    agent.crashes += 1
    agent.restart_at = now + backoff
    log.warning("agent_crashed", agent_rank=agent.rank, code=code, why=agent.previous_exit,
                peak_memory=peak, restart_in=backoff)
    return None


def model_bytes(model_file: Path | str) -> int:
    """Bytes on disk of every subgraph file of one rank's model entry (one file, ';'-joined files or a folder)."""
    return sum(shard_bytes(path) for path in subgraph_files(model_file))


def does_not_fit(agent: AgentProcess, memory_limit: int) -> str:
    """The one-line reason the launcher gives up on a rank whose shard cannot load under the limit."""
    return (f"rank {agent.rank} was killed by the OOM killer {agent.oom_kills_loading} times while loading its "
            f"shard ({format_size(model_bytes(agent.model_file))}, {agent.model_file}): it does not fit the "
            f"memory limit of {format_size(memory_limit)} per agent; shard the model over more ranks or "
            f"raise --memory-limit")
