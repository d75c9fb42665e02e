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

from collections.abc import Sequence
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
    TensorSpec,
)
from zmserve.servable import DistributedModel, ServableSpec
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
    subgraphs: list[ModelSignature] = field(default_factory=list)
    """One signature per subgraph (empty: a single graph, `signature`)."""
    state: AgentState = AgentState.REGISTERED
    model_file: str = ""
    public_key: str | None = None
    """The CURVE key its control connection authenticated with (None over plaintext)."""


@dataclass(frozen=True)
class ModelUse:
    """How one method of the servable calls the model: the inputs it passes, the outputs it takes."""

    method: str
    inputs: int
    outputs: int

    @staticmethod
    def of(spec: ServableSpec) -> list[ModelUse]:
        return [ModelUse(method.name, len(stage.inputs), stage.outputs_count)
                for method in spec.methods.values() for stage in method.stages if stage.is_model]


@dataclass(frozen=True)
class StageGroup:
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
    """Answer every held request UNAVAILABLE with `why`, start new schedulers, report the status at once, and tell
    the launchers which agent processes (rank, pid) were shut down or given up on: each launcher ends its own that
    do not exit by themselves (an agent inside MindSpore's init() cannot act on AGENT_SHUTDOWN)."""

    why: str
    stopped: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class StartServing:
    """Every agent is ready: the model's inputs are the first stage's, its outputs the last stage's (for each
    subgraph in `subgraphs`; `signature` is subgraph 0's)."""

    signature: ModelSignature
    subgraphs: tuple[ModelSignature, ...] = ()


Action = SendToAgent | RestartGroups | StartServing


class Membership:
    def __init__(self, model: DistributedModel, heartbeat_interval: float, heartbeat_liveness: int,
                 stage_input_address: str, results_address: str, forming_timeout: float = FORMING_TIMEOUT_S,
                 servable: str = "", uses: Sequence[ModelUse] = (), max_sequences: int = 0) -> None:
        self.model = model
        self.max_sequences = max_sequences
        """Told to every agent (AgentConfigure.max_sequences): its bound on the sequences whose state it keeps."""
        self.servable = f"servable {servable!r}" if servable else "this servable"
        self.uses = list(uses)
        """What the servable's methods expect of the model: a shard whose export says otherwise is refused."""
        self.heartbeat_interval, self.heartbeat_liveness = heartbeat_interval, heartbeat_liveness
        self.stage_input_address, self.results_address = stage_input_address, results_address
        self.forming_timeout = forming_timeout
        self.stages = [StageGroup(k, model.ranks_of(k)) for k in range(model.stage_size)]
        self.schedulers: list[tuple[str, int]] = []
        """Each stage's scheduler (host, port); the worker starts them and tells us (`schedulers_started`)."""
        self.state = WorkerState.WAITING_FOR_AGENTS
        self.since = 0.0
        """When the current state began (the clock of `tick`)."""
        self.agents: dict[int, AgentRecord] = {}
        self.subscribed: set[int] = set()
        """Stage-0 ranks subscribed to the worker's publisher: a publish before that would be lost."""
        self.last_restart: str | None = None
        """Why the agents were last restarted: said with the status until the servable serves again."""

    # ---- queries --------------------------------------------------------------------------------------------
    def by_identity(self, identity: bytes) -> AgentRecord | None:
        return next((a for a in self.agents.values() if a.identity == identity), None)

    def missing(self) -> list[int]:
        return [r for r in range(self.model.rank_size) if r not in self.agents]

    def status_reason(self) -> str:
        """Why the servable is not serving, in words for the broker, the logs and an UNAVAILABLE reply."""
        restarted = f"; agents restarted because {self.last_restart}" if self.last_restart else ""
        if self.state == WorkerState.WAITING_FOR_AGENTS:
            missing = self.missing()
            return (f"waiting for agents: {self.model.rank_size - len(missing)}/{self.model.rank_size} "
                    f"registered, missing ranks {missing}{restarted}")
        if self.state == WorkerState.FORMING_GROUPS:
            ready = [a.rank for a in self.agents.values() if a.state == AgentState.READY]
            return f"forming collective groups: {len(ready)}/{self.model.rank_size} agents ready{restarted}"
        return ""

    # ---- events ---------------------------------------------------------------------------------------------
    def schedulers_started(self, addresses: list[tuple[str, int]], now: float) -> list[Action]:
        """New schedulers listen (at start, and after every RestartGroups): a cluster that became complete while
        they were being replaced is configured now, with their addresses."""
        self.schedulers = list(addresses)
        self.since = now
        if self.state == WorkerState.WAITING_FOR_AGENTS and self.agents and not self.missing():
            return self.configure(now)
        return []

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
            why = f"its process {previous.pid} was {message.previous_exit}" if message.previous_exit \
                else "its rank registered again from a new process"
            actions += self.lose(previous, why, now)
        problem, retry = self.why_not_accepted(message)
        if problem is not None:
            log.warning("agent_rejected", agent_rank=rank, why=problem, retry=retry)
            return [*actions, SendToAgent(identity, AgentRejected(message=problem, retry=retry))]
        self.agents[rank] = AgentRecord(rank, identity, message.host, message.pid, message.publish_address,
                                        Liveness(self.heartbeat_interval, self.heartbeat_liveness, now),
                                        message.shard.signature, list(message.shard.subgraphs),
                                        model_file=message.model_file, public_key=public_key)
        missing = self.missing()
        log.debug("agent_registered", agent_rank=rank, host=message.host, pid=message.pid,
                  registered=self.model.rank_size - len(missing), missing=missing, previous_exit=message.previous_exit)
        if not missing and not any(isinstance(action, RestartGroups) for action in actions):
            actions += self.configure(now)  # (after a restart, schedulers_started configures, with new schedulers)
        return actions

    def why_not_accepted(self, message: AgentRegister) -> tuple[str | None, bool]:
        """Why this registration is refused, and whether trying again later could succeed. A shard whose export
        (group_config.json) contradicts the servable is refused for good, with both sides in the message."""
        rank, model = message.rank, self.model
        problem = self.shard_mismatch(message)
        if problem is not None:
            return f"the shard {message.model_file} does not fit rank {rank} of {self.describe()}: {problem}", False
        if not 0 <= rank < model.rank_size:
            return f"rank {rank} is outside the ranks 0..{model.rank_size - 1} of {self.describe()}", False
        if rank in self.agents:
            other = self.agents[rank]
            return f"rank {rank} is already held by the agent with pid {other.pid} on {other.host}", True
        if self.state != WorkerState.WAITING_FOR_AGENTS:
            return f"the cluster is already complete ({self.state})", True
        return None, False

    def describe(self) -> str:
        return f"{self.servable} (rank_size {self.model.rank_size}, stage_size {self.model.stage_size})"

    def shard_mismatch(self, message: AgentRegister) -> str | None:
        """What the shard's export says that contradicts the servable or the shards registered so far."""
        rank, shard, model = message.rank, message.shard, self.model
        says = {"rank_size": (shard.rank_size, model.rank_size), "stage_size": (shard.stage_size, model.stage_size)}
        if 0 <= rank < model.rank_size:
            says |= {"rank": (shard.rank, rank), "stage": (shard.stage, model.stage_of(rank))}
        wrong = [f"{key} {got} (servable: {expected})" for key, (got, expected) in says.items()
                 if got is not None and got != expected]
        if wrong:
            return "its export says " + ", ".join(wrong)
        if not 0 <= rank < model.rank_size:
            return None  # refused below as out of range
        for other in self.agents.values():
            if len(other.subgraphs) != len(shard.subgraphs):
                return (f"it has {max(1, len(shard.subgraphs))} subgraphs, rank {other.rank} ({other.model_file}) "
                        f"has {max(1, len(other.subgraphs))}")
        for index, signature in enumerate(shard.subgraphs or [shard.signature]):
            if (problem := self.signature_mismatch(model.stage_of(rank), signature, index)) is not None:
                return problem if not shard.subgraphs else f"subgraph {index}: {problem}"
        return None

    def signature_mismatch(self, stage: int, signature: ModelSignature, subgraph: int = 0) -> str | None:
        """A shard's inputs and outputs (of one subgraph) against the methods (stage 0 takes what the methods
        pass, the last stage gives what they take), the other ranks of its stage (all the same) and the
        neighbouring stages (stage k's outputs are stage k+1's inputs). Only what both sides state is compared."""
        inputs, outputs, last = signature.inputs, signature.outputs, self.model.stage_size - 1
        for use in self.uses if subgraph == 0 else ():
            if stage == 0 and inputs is not None and len(inputs) != use.inputs:
                return (f"its export takes {len(inputs)} inputs {describe_specs(inputs)}, but method "
                        f"{use.method!r} passes {use.inputs} to the model")
            if stage == last and outputs is not None and len(outputs) != use.outputs:
                return (f"its export gives {len(outputs)} outputs {describe_specs(outputs)}, but method "
                        f"{use.method!r} takes {use.outputs} from the model")
        for other in self.agents.values():
            other_stage = self.model.stage_of(other.rank)
            theirs = other.subgraphs[subgraph] if subgraph < len(other.subgraphs) else other.signature
            if other_stage == stage and signature.stateful != theirs.stateful:
                return (f"it is {'' if signature.stateful else 'not '}stateful, unlike rank {other.rank} of the "
                        f"same stage ({other.model_file})")
            if other_stage == stage and not same_specs(inputs, theirs.inputs):
                return (f"its inputs {describe_specs(inputs)} differ from those of rank {other.rank} of the same "
                        f"stage ({other.model_file}): {describe_specs(theirs.inputs)}")
            if other_stage == stage and not same_specs(outputs, theirs.outputs):
                return (f"its outputs {describe_specs(outputs)} differ from those of rank {other.rank} of the "
                        f"same stage ({other.model_file}): {describe_specs(theirs.outputs)}")
            if other_stage == stage - 1 and not specs_fit(theirs.outputs, inputs):
                return (f"its inputs {describe_specs(inputs)} do not fit the outputs of stage {other_stage} "
                        f"(rank {other.rank}, {other.model_file}): {describe_specs(theirs.outputs)}")
            if other_stage == stage + 1 and not specs_fit(outputs, theirs.inputs):
                return (f"its outputs {describe_specs(outputs)} do not fit the inputs of stage {other_stage} "
                        f"(rank {other.rank}, {other.model_file}): {describe_specs(theirs.inputs)}")
        return None

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
                    max_sequences=self.max_sequences,
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
        self.state, self.last_restart = WorkerState.SERVING, None
        first, last = self.agents[self.stages[0].leader], self.agents[self.stages[-1].leader]
        subgraphs = tuple(ModelSignature(inputs=a.inputs, outputs=b.outputs, stateful=a.stateful)
                          for a, b in zip(first.subgraphs, last.subgraphs, strict=True))
        return [StartServing(ModelSignature(inputs=first.signature.inputs, outputs=last.signature.outputs,
                                            stateful=first.signature.stateful), subgraphs)]

    def failed(self, agent: AgentRecord, message: str, now: float) -> list[Action]:
        return self.lose(agent, f"agent failed: {message}", now)

    def stopped(self, rank: int, pid: int, reason: str, now: float) -> list[Action]:
        """The launcher stops this agent on purpose (AGENT_STOPPED): its group is broken all the same, but nothing
        failed, so this is information, not a lost agent. A note about a process no longer held is ignored (the
        first note of a stopping launcher already restarted the groups)."""
        agent = self.agents.get(rank)
        if agent is None or agent.pid != pid:
            return []
        log.info("agent_stopped", agent_rank=rank, reason=reason, state=self.state)
        return self.forget(agent, f"agent rank {rank} stopped ({reason})", now)

    def exited(self, rank: int, pid: int, why: str, now: float) -> list[Action]:
        """Its launcher saw agent process `pid` of `rank` end: lose it now if it is the one holding the rank (a
        report about an older process of the rank changes nothing)."""
        agent = self.agents.get(rank)
        if agent is None or agent.pid != pid:
            return []
        return self.lose(agent, f"its process {pid} was {why}", now)

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
        return self.forget(agent, f"agent rank {agent.rank} was lost ({why})", now)

    def forget(self, agent: AgentRecord, why: str, now: float) -> list[Action]:
        self.agents.pop(agent.rank, None)
        return self.restart(why, now, lost=agent)

    def restart(self, why: str, now: float, lost: AgentRecord | None = None) -> list[Action]:
        """A group with a lost or stuck member is broken for good: every agent exits so that its launcher starts
        a fresh process, and the servable waits for all ranks again. The lost agent is not told (it is dead, or
        replaced, or not listening), but its launcher is, with the others: a live one is ended all the same."""
        shutdown = AgentShutdown(reason=why)
        actions: list[Action] = [SendToAgent(a.identity, shutdown) for a in self.agents.values()]
        stopped = tuple((a.rank, a.pid) for a in [*([lost] if lost is not None else []), *self.agents.values()])
        self.agents.clear()
        self.subscribed.clear()
        self.state, self.since, self.last_restart = WorkerState.WAITING_FOR_AGENTS, now, why
        return [*actions, RestartGroups(why, stopped)]

    def stop(self, reason: str) -> list[Action]:
        """The worker is stopping: every agent exits (its launcher starts a new one for the next worker)."""
        shutdown = AgentShutdown(reason=reason)
        return [SendToAgent(a.identity, shutdown) for a in self.agents.values()]


# ---- signatures ---------------------------------------------------------------------------------------------
def describe_specs(specs: list[TensorSpec] | None) -> str:
    if specs is None:
        return "(not stated)"
    return "[" + ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in specs) + "]"


def same_specs(mine: list[TensorSpec] | None, theirs: list[TensorSpec] | None) -> bool:
    """Ranks of one stage run the same graph: equal where both state it (names aside)."""
    if mine is None or theirs is None:
        return True
    return [(s.dtype, s.shape) for s in mine] == [(s.dtype, s.shape) for s in theirs]


def specs_fit(outputs: list[TensorSpec] | None, inputs: list[TensorSpec] | None) -> bool:
    """One stage's outputs feed the next stage's inputs: same count and dtypes, shapes equal where neither is -1
    (a dynamic dimension). Names do not matter: values travel between stages by position."""
    if outputs is None or inputs is None:
        return True
    if len(outputs) != len(inputs):
        return False
    return all(o.dtype == i.dtype and len(o.shape) == len(i.shape)
               and all(a == b or a < 0 or b < 0 for a, b in zip(o.shape, i.shape, strict=True))
               for o, i in zip(outputs, inputs, strict=True))
