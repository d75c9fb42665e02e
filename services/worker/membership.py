"""Which agents hold which ranks, and what the worker must do when that changes: a state machine with no sockets.

Events go in (an agent registered, became ready, failed, subscribed, went silent; time passed), actions come out
(send this message to that agent; restart every group; start serving). The worker's loop turns socket traffic
into events and carries out the actions, so every membership rule is unit-tested without MindSpore
(`tests/services/worker/test_membership.py`).

States:
  WAITING_FOR_AGENTS  agents register until every rank is in;
  FORMING_GROUPS      each agent was told its stage, its group's scheduler and where its data comes from; waiting
                      for every AGENT_READY and for stage 0 to subscribe to the worker's publisher;
  SERVING             every agent is ready.
Losing any agent returns to WAITING_FOR_AGENTS through RestartGroups: a MindSpore process cannot re-join a group,
so every agent of the servable is told to shut down and their launchers start fresh ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from zmserve.logs import get_logger
from zmserve.protocol import (
    AgentConfigure,
    AgentRegister,
    AgentRejected,
    AgentShutdown,
    Forward,
    Message,
    ModelSignature,
)
from zmserve.servable import DistributedModel
from zmserve.transport import Liveness

log = get_logger("worker")

FORMING_TIMEOUT_S = 120.0
"""How long agents may take to join their group and load after configuration (8 agents share 2 cores)."""


class WorkerState(StrEnum):
    WAITING_FOR_AGENTS = "waiting_for_agents"
    FORMING_GROUPS = "forming_groups"
    SERVING = "serving"


class AgentState(StrEnum):
    REGISTERED = "registered"  # said hello, waits for the whole cluster
    CONFIGURED = "configured"  # told how to form its group; loading and joining
    READY = "ready"  # group formed, model loaded and warmed up


@dataclass
class AgentRecord:
    rank: int
    identity: bytes
    host: str
    pid: int
    publish_address: str
    liveness: Liveness
    signature: ModelSignature = field(default_factory=ModelSignature)
    state: AgentState = AgentState.REGISTERED
    public_key: str | None = None
    """The CURVE key its control connection authenticated with (None over plaintext)."""


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its ranks form one MindSpore collective group around its own scheduler."""

    index: int
    ranks: range

    @property
    def leader(self) -> int:
        """The rank that forwards the stage's output (every rank of a stage holds the same output)."""
        return self.ranks[0]


# ---- actions ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SendToAgent:
    identity: bytes
    message: Message


@dataclass(frozen=True)
class RestartGroups:
    """Answer every held request UNAVAILABLE with `why`, start new schedulers, report the status at once."""

    why: str


@dataclass(frozen=True)
class StartServing:
    """Every agent is ready: the model's inputs are the first stage's, its outputs the last stage's."""

    signature: ModelSignature


Action = SendToAgent | RestartGroups | StartServing


class Membership:
    def __init__(self, model: DistributedModel, heartbeat_interval: float, heartbeat_liveness: int,
                 stage_input_address: str, results_address: str, forming_timeout: float = FORMING_TIMEOUT_S) -> None:
        self.model = model
        self.heartbeat_interval, self.heartbeat_liveness = heartbeat_interval, heartbeat_liveness
        self.stage_input_address, self.results_address = stage_input_address, results_address
        self.forming_timeout = forming_timeout
        self.stages = [Stage(k, model.ranks_of(k)) for k in range(model.stage_size)]
        self.schedulers: list[tuple[str, int]] = []
        """Each stage's scheduler (host, port); the worker starts them and tells us (`schedulers_started`)."""
        self.state = WorkerState.WAITING_FOR_AGENTS
        self.since = 0.0
        """When the current state began (the clock of `tick`)."""
        self.agents: dict[int, AgentRecord] = {}
        self.subscribed: set[int] = set()
        """Stage-0 ranks subscribed to the worker's publisher: a publish before that would be lost."""

    # ---- queries --------------------------------------------------------------------------------------------
    def by_identity(self, identity: bytes) -> AgentRecord | None:
        return next((a for a in self.agents.values() if a.identity == identity), None)

    def missing(self) -> list[int]:
        return [r for r in range(self.model.rank_size) if r not in self.agents]

    def status_reason(self) -> str:
        """Why the servable is not serving, in words for the broker, the logs and an UNAVAILABLE reply."""
        if self.state == WorkerState.WAITING_FOR_AGENTS:
            missing = self.missing()
            return (f"waiting for agents: {self.model.rank_size - len(missing)}/{self.model.rank_size} "
                    f"registered, missing ranks {missing}")
        if self.state == WorkerState.FORMING_GROUPS:
            ready = [a.rank for a in self.agents.values() if a.state == AgentState.READY]
            return f"forming collective groups: {len(ready)}/{self.model.rank_size} agents ready"
        return ""

    # ---- events ---------------------------------------------------------------------------------------------
    def schedulers_started(self, addresses: list[tuple[str, int]], now: float) -> None:
        self.schedulers = list(addresses)
        self.since = now

    def heard(self, identity: bytes, now: float) -> AgentRecord | None:
        """Any message from an agent proves it alive."""
        agent = self.by_identity(identity)
        if agent is not None:
            agent.liveness.heard(now)
        return agent

    def register(self, identity: bytes, message: AgentRegister, now: float,
                 public_key: str | None = None) -> list[Action]:
        rank = message.rank
        actions: list[Action] = []
        previous = self.agents.get(rank)
        if previous is not None and previous.identity != identity and (
                self.state != WorkerState.SERVING or message.replaces_pid == previous.pid):
            # The launcher restarted this rank (it names the pid it replaces), or the cluster is still forming,
            # when heartbeats cannot tell a dead agent (MindSpore holds the GIL while it imports and joins).
            actions += self.lose(previous, "its rank registered again from a new process", now)
        problem, retry = self.why_not_accepted(message)
        if problem is not None:
            log.warning("agent_rejected", agent_rank=rank, why=problem, retry=retry)
            return [*actions, SendToAgent(identity, AgentRejected(message=problem, retry=retry))]
        self.agents[rank] = AgentRecord(rank, identity, message.host, message.pid, message.publish_address,
                                        Liveness(self.heartbeat_interval, self.heartbeat_liveness, now),
                                        message.shard.signature, public_key=public_key)
        missing = self.missing()
        log.debug("agent_registered", agent_rank=rank, host=message.host, pid=message.pid,
                  registered=self.model.rank_size - len(missing), missing=missing)
        if not missing:
            actions += self.configure(now)
        return actions

    def why_not_accepted(self, message: AgentRegister) -> tuple[str | None, bool]:
        """Why this registration is refused, and whether trying again later could succeed."""
        rank, shard, model = message.rank, message.shard, self.model
        if not 0 <= rank < model.rank_size:
            return f"rank {rank} is outside this servable's ranks 0..{model.rank_size - 1}", False
        expected = {"rank_size": model.rank_size, "stage_size": model.stage_size, "rank": rank,
                    "stage": model.stage_of(rank)}
        shard_says = {"rank_size": shard.rank_size, "stage_size": shard.stage_size, "rank": shard.rank,
                      "stage": shard.stage}
        wrong = [f"{key} {shard_says[key]} (servable: {value})" for key, value in expected.items()
                 if shard_says[key] is not None and shard_says[key] != value]
        if wrong:
            return (f"the shard {message.model_file} does not belong to rank {rank} of this servable "
                    f"(rank_size {model.rank_size}, stage_size {model.stage_size}): its export says "
                    + ", ".join(wrong)), False
        if rank in self.agents:
            other = self.agents[rank]
            return f"rank {rank} is already held by the agent with pid {other.pid} on {other.host}", True
        if self.state != WorkerState.WAITING_FOR_AGENTS:
            return f"the cluster is already complete ({self.state})", True
        return None, False

    def configure(self, now: float) -> list[Action]:
        """Tell every agent its stage, its group's scheduler, and where its inputs and outputs go."""
        self.state, self.since = WorkerState.FORMING_GROUPS, now
        actions: list[Action] = []
        last = len(self.stages) - 1
        for stage in self.stages:
            host, port = self.schedulers[stage.index]
            for rank in stage.ranks:
                agent = self.agents[rank]
                leader = rank == stage.leader
                forward = (Forward.RESULT if stage.index == last else Forward.PUBLISH) if leader else Forward.NONE
                agent.state = AgentState.CONFIGURED
                publisher = self.agents[self.stages[stage.index - 1].leader] if stage.index > 0 else None
                downstream = list(self.stages[stage.index + 1].ranks) if forward == Forward.PUBLISH else []
                actions.append(SendToAgent(agent.identity, AgentConfigure(
                    stage=stage.index, stage_size=len(self.stages), node_id=rank - stage.ranks[0],
                    group_size=len(stage.ranks), scheduler_host=host, scheduler_port=port,
                    input_address=self.stage_input_address if publisher is None else publisher.publish_address,
                    result_address=self.results_address, forward=forward, downstream_ranks=downstream,
                    input_key=publisher.public_key if publisher is not None else None,
                    downstream_keys=sorted({key for r in downstream if (key := self.agents[r].public_key)}),
                )))
        log.debug("forming_groups", stages=len(self.stages), schedulers=[f"{h}:{p}" for h, p in self.schedulers])
        return actions

    def ready(self, agent: AgentRecord, load_seconds: float) -> list[Action]:
        agent.state = AgentState.READY
        log.debug("agent_ready", agent_rank=agent.rank, load_seconds=load_seconds)
        return self.maybe_serve()

    def subscription(self, subscribed: bool, rank: int) -> list[Action]:
        if not subscribed:
            self.subscribed.discard(rank)
            return []
        self.subscribed.add(rank)
        return self.maybe_serve()

    def maybe_serve(self) -> list[Action]:
        if self.state != WorkerState.FORMING_GROUPS or len(self.agents) != self.model.rank_size:
            return []
        if any(a.state != AgentState.READY for a in self.agents.values()):
            return []
        if not set(self.stages[0].ranks) <= self.subscribed:
            return []
        self.state = WorkerState.SERVING
        first = self.agents[self.stages[0].leader].signature
        last = self.agents[self.stages[-1].leader].signature
        return [StartServing(ModelSignature(inputs=first.inputs, outputs=last.outputs))]

    def failed(self, agent: AgentRecord, message: str, now: float) -> list[Action]:
        return self.lose(agent, f"agent failed: {message}", now)

    def tick(self, now: float) -> list[Action]:
        """Time passed: a silent agent while serving, or a formation that takes too long, restarts the groups.

        Liveness is not judged before SERVING: MindSpore holds the GIL while it imports and joins its group, so
        an agent's heartbeats stall then; the forming timeout covers a stuck formation instead."""
        if self.state == WorkerState.SERVING:
            for agent in self.agents.values():
                if agent.liveness.expired(now):
                    return self.lose(agent, f"no heartbeat for {agent.liveness.timeout:.1f} s", now)
        elif self.state == WorkerState.FORMING_GROUPS and now - self.since > self.forming_timeout:
            not_ready = [a.rank for a in self.agents.values() if a.state != AgentState.READY]
            unsubscribed = sorted(set(self.stages[0].ranks) - self.subscribed)
            return self.restart(f"{self.forming_timeout:.0f} s after configuration, ranks {not_ready} were not "
                                f"ready and ranks {unsubscribed} had not subscribed", now)
        return []

    def lose(self, agent: AgentRecord, why: str, now: float) -> list[Action]:
        log.warning("agent_lost", agent_rank=agent.rank, why=why, state=self.state)
        self.agents.pop(agent.rank, None)
        return self.restart(f"agent rank {agent.rank} was lost ({why})", now)

    def restart(self, why: str, now: float) -> list[Action]:
        """A group with a lost or stuck member is broken for good: every agent exits so that its launcher starts
        a fresh process, and the servable waits for all ranks again."""
        shutdown = AgentShutdown(reason=why)
        actions: list[Action] = [SendToAgent(a.identity, shutdown) for a in self.agents.values()]
        self.agents.clear()
        self.subscribed.clear()
        self.state, self.since = WorkerState.WAITING_FOR_AGENTS, now
        return [*actions, RestartGroups(why)]

    def stop(self, reason: str) -> list[Action]:
        """The worker is stopping: every agent exits (its launcher starts a new one for the next worker)."""
        shutdown = AgentShutdown(reason=reason)
        return [SendToAgent(a.identity, shutdown) for a in self.agents.values()]
