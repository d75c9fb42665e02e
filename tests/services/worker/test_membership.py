"""The worker's membership rules, driven event by event with no sockets and no MindSpore."""

from __future__ import annotations

import pytest

from zmserve.protocol import (
    AgentConfigure,
    AgentRegister,
    AgentRejected,
    AgentShutdown,
    Forward,
    ModelSignature,
    ShardInfo,
    TensorSpec,
)
from zmserve.servable import DistributedModel
from zmserve_services.worker.membership import (
    AgentState,
    Membership,
    ModelUse,
    RestartGroups,
    SendToAgent,
    StartServing,
    WorkerState,
)

STAGE_INPUT, RESULTS = "tcp://127.0.0.1:9000", "tcp://127.0.0.1:9001"
INPUTS = [TensorSpec("x", "float32", [4, 8])]
HIDDEN = [TensorSpec("h", "float32", [4, -1])]
OUTPUTS = [TensorSpec("y", "float32", [4, 2])]
PREDICT = ModelUse("predict", inputs=1, outputs=1)
"""The servable's one method passes x to the model and takes y: stage 0 maps x to h, the last stage h to y."""


def stage_signature(stage: int, stage_size: int) -> ModelSignature:
    return ModelSignature(INPUTS if stage == 0 else HIDDEN, OUTPUTS if stage == stage_size - 1 else HIDDEN)


def membership(rank_size: int = 4, stage_size: int = 2, uses: tuple[ModelUse, ...] = (PREDICT,)) -> Membership:
    machine = Membership(DistributedModel(rank_size, stage_size, with_batch_dim=False), heartbeat_interval=1.0,
                         heartbeat_liveness=3, stage_input_address=STAGE_INPUT, results_address=RESULTS,
                         forming_timeout=120.0, servable="mlp", uses=uses)
    machine.schedulers_started([("127.0.0.1", 6000 + k) for k in range(stage_size)], now=0.0)
    return machine


def identity(rank: int, generation: int = 0) -> bytes:
    return f"agent-{rank}-{generation}".encode()


def register(rank: int, pid: int | None = None, replaces: int | None = None, shard: ShardInfo | None = None,
             model: DistributedModel | None = None) -> AgentRegister:
    if shard is None and model is not None:
        shard = ShardInfo(rank=rank, rank_size=model.rank_size, stage=model.stage_of(rank),
                          stage_size=model.stage_size, signature=stage_signature(model.stage_of(rank),
                                                                                 model.stage_size))
    return AgentRegister(rank=rank, host="127.0.0.1", pid=pid or 100 + rank, model_file=f"d{rank}.mindir",
                         publish_address=f"tcp://127.0.0.1:{7000 + rank}", replaces_pid=replaces,
                         shard=shard or ShardInfo())


def sends(actions: list) -> list[tuple[bytes, object]]:
    return [(a.identity, a.message) for a in actions if isinstance(a, SendToAgent)]


def bring_to_serving(machine: Membership, now: float = 1.0) -> list:
    actions: list = []
    for rank in range(machine.model.rank_size):
        actions += machine.register(identity(rank), register(rank, model=machine.model), now)
    for rank in range(machine.model.rank_size):
        actions += machine.ready(machine.agents[rank], load_seconds=1.0)
    for rank in machine.stages[0].ranks:
        actions += machine.subscription(True, rank)
    return actions


def test_configures_every_agent_when_the_last_rank_registers() -> None:
    machine = membership()
    assert machine.register(identity(0), register(0), 1.0) == []
    assert machine.register(identity(2), register(2), 1.0) == []
    assert machine.missing() == [1, 3]
    assert "2/4 registered, missing ranks [1, 3]" in machine.status_reason()
    machine.register(identity(1), register(1), 1.0)
    configures = dict(sends(machine.register(identity(3), register(3), 2.0)))
    assert machine.state == WorkerState.FORMING_GROUPS
    assert set(configures) == {identity(r) for r in range(4)}
    first, second = configures[identity(0)], configures[identity(2)]
    assert isinstance(first, AgentConfigure) and isinstance(second, AgentConfigure)
    assert (first.stage, first.node_id, first.forward, first.downstream_ranks) == (0, 0, Forward.PUBLISH, [2, 3])
    assert first.input_address == STAGE_INPUT and first.scheduler_port == 6000
    assert configures[identity(1)].forward == Forward.NONE
    assert (second.stage, second.node_id, second.forward) == (1, 0, Forward.RESULT)
    assert second.input_address == "tcp://127.0.0.1:7000"  # stage 0's leader publishes to stage 1
    assert second.scheduler_port == 6001 and configures[identity(3)].node_id == 1
    assert all(c.result_address == RESULTS for c in configures.values())


def test_serves_only_when_every_agent_is_ready_and_stage_zero_subscribed() -> None:
    machine = membership()
    for rank in range(4):
        machine.register(identity(rank), register(rank, model=machine.model), 1.0)
    for rank in range(4):
        assert machine.ready(machine.agents[rank], 2.0) == []
    assert machine.subscription(True, 0) == []
    assert machine.subscription(False, 0) == []
    assert machine.subscription(True, 1) == []
    actions = machine.subscription(True, 0)
    assert actions == [StartServing(ModelSignature(INPUTS, OUTPUTS))]  # stage 0's inputs, the last stage's outputs
    assert machine.state == WorkerState.SERVING and machine.status_reason() == ""


def test_a_silent_agent_restarts_every_group_only_while_serving() -> None:
    machine = membership()
    bring_to_serving(machine, now=1.0)
    for agent in machine.agents.values():
        agent.liveness.heard(10.0)
    assert machine.tick(12.9) == []
    machine.heard(identity(0), 12.0)
    machine.heard(identity(1), 12.0)
    machine.heard(identity(3), 12.0)
    actions = machine.tick(13.5)  # rank 2 was last heard at 10.0: 3.5 s > 3 s
    assert isinstance(actions[-1], RestartGroups) and "agent rank 2 was lost (no heartbeat" in actions[-1].why
    shut_down = {ident for ident, message in sends(actions) if isinstance(message, AgentShutdown)}
    assert shut_down == {identity(0), identity(1), identity(3)}
    assert machine.state == WorkerState.WAITING_FOR_AGENTS and machine.agents == {}
    # the silent one is not told, but its launcher is, with the others: a live but stuck process is ended too
    assert sorted(actions[-1].stopped) == [(0, 100), (1, 101), (2, 102), (3, 103)]


def test_silence_while_forming_is_not_judged_but_the_forming_timeout_is() -> None:
    machine = membership()
    for rank in range(4):
        machine.register(identity(rank), register(rank), 1.0)
    machine.ready(machine.agents[0], 1.0)
    assert machine.tick(100.0) == []  # heartbeats stall while MindSpore imports and joins
    actions = machine.tick(121.5)
    assert isinstance(actions[-1], RestartGroups)
    assert "ranks [1, 2, 3] were not ready and ranks [0, 1] had not subscribed" in actions[-1].why


def test_a_restarted_rank_naming_the_dead_pid_replaces_it_while_serving() -> None:
    machine = membership()
    bring_to_serving(machine)
    actions = machine.register(identity(1, generation=1), register(1, pid=555, replaces=101), 5.0)
    assert isinstance(actions[-1], RestartGroups)
    assert next(a for a in actions if isinstance(a, RestartGroups)).why.startswith("agent rank 1 was lost")
    assert machine.agents.keys() == {1} and machine.agents[1].pid == 555
    assert machine.state == WorkerState.WAITING_FOR_AGENTS


def test_a_replacement_that_completes_the_cluster_is_configured_with_the_new_schedulers() -> None:
    """The restart a replacement causes starts new schedulers: the configuration must name them, not the old."""
    machine = membership(rank_size=1, stage_size=1)
    bring_to_serving(machine)
    actions = machine.register(identity(0, generation=1), register(0, pid=555, replaces=100), 5.0)
    assert isinstance(actions[-1], RestartGroups) and not any(
        isinstance(message, AgentConfigure) for _, message in sends(actions))
    configures = sends(machine.schedulers_started([("127.0.0.1", 6100)], now=5.1))
    [(who, configure)] = configures
    assert who == identity(0, generation=1)
    assert isinstance(configure, AgentConfigure) and configure.scheduler_port == 6100
    assert machine.state == WorkerState.FORMING_GROUPS


def test_a_second_process_for_a_held_rank_is_refused_while_serving() -> None:
    machine = membership()
    bring_to_serving(machine)
    actions = machine.register(identity(1, generation=1), register(1, pid=999, replaces=None), 5.0)
    [(who, message)] = sends(actions)
    assert who == identity(1, generation=1)
    assert isinstance(message, AgentRejected) and message.retry
    assert "already held by the agent with pid 101" in message.message
    assert machine.state == WorkerState.SERVING and machine.agents[1].identity == identity(1)


def test_a_held_rank_registering_again_while_forming_restarts_the_groups() -> None:
    machine = membership()
    for rank in range(4):
        machine.register(identity(rank), register(rank), 1.0)
    actions = machine.register(identity(2, generation=1), register(2, pid=777), 3.0)
    assert any(isinstance(a, RestartGroups) for a in actions)
    assert machine.agents.keys() == {2} and machine.state == WorkerState.WAITING_FOR_AGENTS


@pytest.mark.parametrize(
    ("shard", "fragment"),
    [
        (ShardInfo(rank=0, rank_size=8, stage=0, stage_size=1), "rank_size 8 (servable: 4), stage_size 1"),
        (ShardInfo(rank=3, rank_size=4, stage=1, stage_size=2), "rank 3 (servable: 1)"),
        (ShardInfo(rank=1, rank_size=4, stage=1, stage_size=2), "stage 1 (servable: 0)"),
    ],
)
def test_a_shard_of_another_model_is_refused_for_good(shard: ShardInfo, fragment: str) -> None:
    machine = membership()
    [(_, message)] = sends(machine.register(identity(1), register(1, shard=shard), 1.0))
    assert isinstance(message, AgentRejected) and not message.retry
    assert fragment in message.message
    assert "the shard d1.mindir does not fit rank 1 of servable 'mlp' (rank_size 4, stage_size 2)" in message.message
    assert machine.agents == {}


def test_the_matmul_shards_given_to_the_mlp_say_both_sides() -> None:
    """Ranks 4..7 of an 8-rank export are not outside 'the servable' first: their export contradicts it."""
    machine = membership()
    shard = ShardInfo(rank=5, rank_size=8, stage=0, stage_size=1)
    [(_, message)] = sends(machine.register(identity(5), register(5, shard=shard), 1.0))
    assert not message.retry
    assert message.message == ("the shard d5.mindir does not fit rank 5 of servable 'mlp' (rank_size 4, "
                               "stage_size 2): its export says rank_size 8 (servable: 4), stage_size 1 (servable: 2)")


def signed(rank: int, inputs: list[TensorSpec] | None, outputs: list[TensorSpec] | None,
           rank_size: int = 4, stage_size: int = 2) -> AgentRegister:
    model = DistributedModel(rank_size, stage_size, with_batch_dim=False)
    return register(rank, shard=ShardInfo(rank=rank, rank_size=rank_size, stage=model.stage_of(rank),
                                          stage_size=stage_size, signature=ModelSignature(inputs, outputs)))


@pytest.mark.parametrize(
    ("uses", "rank", "inputs", "outputs", "fragment"),
    [
        ((ModelUse("predict", 2, 1),), 0, INPUTS, HIDDEN,
         "its export takes 1 inputs [x float32[4, 8]], but method 'predict' passes 2 to the model"),
        ((PREDICT, ModelUse("embed", 1, 3)), 3, HIDDEN, OUTPUTS,
         "its export gives 1 outputs [y float32[4, 2]], but method 'embed' takes 3 from the model"),
    ],
)
def test_a_shard_whose_signature_does_not_fit_the_methods_is_refused_for_good(
        uses: tuple[ModelUse, ...], rank: int, inputs: list, outputs: list, fragment: str) -> None:
    machine = membership(uses=uses)
    [(_, message)] = sends(machine.register(identity(rank), signed(rank, inputs, outputs), 1.0))
    assert isinstance(message, AgentRejected) and not message.retry
    assert message.message.endswith(fragment), message.message


def test_ranks_of_one_stage_must_carry_the_same_signature() -> None:
    machine = membership()
    assert sends(machine.register(identity(2), signed(2, HIDDEN, OUTPUTS), 1.0)) == []
    other = [TensorSpec("y", "float16", [4, 2])]
    [(_, message)] = sends(machine.register(identity(3), signed(3, HIDDEN, other), 1.0))
    assert not message.retry and message.message.endswith(
        "its outputs [y float16[4, 2]] differ from those of rank 2 of the same stage (d2.mindir): [y float32[4, 2]]")


def test_one_stages_outputs_must_fit_the_next_stages_inputs() -> None:
    machine = membership()
    assert sends(machine.register(identity(0), signed(0, INPUTS, HIDDEN), 1.0)) == []
    [(_, message)] = sends(machine.register(identity(2), signed(2, [TensorSpec("h", "float32", [4, 8, 1])],
                                                                  OUTPUTS), 1.0))
    assert not message.retry and message.message.endswith(
        "its inputs [h float32[4, 8, 1]] do not fit the outputs of stage 0 (rank 0, d0.mindir): [h float32[4, -1]]")
    # a dynamic dimension (-1) fits any size, and names do not matter between stages
    assert sends(machine.register(identity(2), signed(2, [TensorSpec("z", "float32", [4, 8])], OUTPUTS), 1.0)) == []


def test_a_shard_that_states_nothing_is_taken_on_trust() -> None:
    machine = membership()
    for rank in range(4):
        assert not any(isinstance(m, AgentRejected) for _, m in sends(machine.register(identity(rank),
                                                                                        register(rank), 1.0)))
    assert machine.state == WorkerState.FORMING_GROUPS


def test_a_rank_outside_the_servable_is_refused_for_good() -> None:
    machine = membership()
    [(_, message)] = sends(machine.register(identity(9), register(9), 1.0))
    assert isinstance(message, AgentRejected) and not message.retry and "outside" in message.message


def test_an_agent_that_failed_restarts_every_group() -> None:
    machine = membership()
    for rank in range(4):
        machine.register(identity(rank), register(rank), 1.0)
    actions = machine.failed(machine.agents[3], "RuntimeError: join failed", 2.0)
    assert isinstance(actions[-1], RestartGroups) and "agent failed: RuntimeError: join failed" in actions[-1].why
    assert len(sends(actions)) == 3


def test_an_agent_its_launcher_stops_restarts_every_group_once() -> None:
    machine = membership()
    bring_to_serving(machine)
    assert machine.stopped(1, pid=999, reason="its launcher is stopping", now=2.0) == [], "another process"
    actions = machine.stopped(1, pid=101, reason="its launcher is stopping", now=2.0)
    assert isinstance(actions[-1], RestartGroups)
    assert actions[-1].why == "agent rank 1 stopped (its launcher is stopping)"
    assert {ident for ident, m in sends(actions) if isinstance(m, AgentShutdown)} == {identity(r) for r in (0, 2, 3)}
    assert machine.state == WorkerState.WAITING_FOR_AGENTS and machine.agents == {}
    assert machine.stopped(2, pid=102, reason="its launcher is stopping", now=2.1) == [], "already forgotten"


def test_a_restart_while_forming_names_every_agent_process_for_the_launchers() -> None:
    """The agents still inside init() cannot act on AGENT_SHUTDOWN: their launchers end them, by (rank, pid)."""
    machine = membership()
    for rank in range(4):
        machine.register(identity(rank), register(rank), 1.0)
    actions = machine.register(identity(1, generation=1), register(1, pid=555, replaces=101), 3.0)
    restart = next(a for a in actions if isinstance(a, RestartGroups))
    assert restart.stopped[0] == (1, 101), "the replaced process first"
    assert sorted(restart.stopped) == [(0, 100), (1, 101), (2, 102), (3, 103)]
    assert {ident for ident, m in sends(actions) if isinstance(m, AgentShutdown)} == {
        identity(0), identity(2), identity(3)}


def test_stop_tells_every_agent_to_shut_down() -> None:
    machine = membership()
    bring_to_serving(machine)
    assert {ident for ident, m in sends(machine.stop("worker stopping")) if isinstance(m, AgentShutdown)} == {
        identity(r) for r in range(4)}
    assert all(a.state == AgentState.READY for a in machine.agents.values())


def test_the_launcher_reporting_an_agents_exit_restarts_the_groups_at_once() -> None:
    machine = membership()
    bring_to_serving(machine)
    assert machine.exited(1, 999, "killed by signal SIGKILL", 5.0) == [], "not the process holding rank 1"
    assert machine.state == WorkerState.SERVING
    actions = machine.exited(1, 101, "killed by signal SIGKILL", 5.0)
    restart = actions[-1]
    assert isinstance(restart, RestartGroups)
    assert restart.why == "agent rank 1 was lost (its process 101 was killed by signal SIGKILL)"
    assert machine.state == WorkerState.WAITING_FOR_AGENTS and machine.agents == {}


def test_curve_keys_of_the_agents_go_to_their_neighbours() -> None:
    """Each agent's authenticated CURVE key: a stage-1 agent learns its publisher's (stage 0's leader), the leader
    learns the next stage's agents' (its XPUB admits only them); stage 0 reads the worker, whose key it holds."""
    machine = membership(rank_size=6, stage_size=3)
    keys = {rank: f"key-of-host-{'a' if rank < 3 else 'b'}-{rank}" for rank in range(6)}
    actions: list = []
    for rank in range(6):
        actions += machine.register(identity(rank), register(rank), 1.0, public_key=keys[rank])
    configures = {message.stage * 10 + message.node_id: message for _, message in sends(actions)}
    assert configures[0].input_key is None and configures[1].input_key is None  # stage 0 reads the worker
    assert configures[0].downstream_keys == [keys[2], keys[3]] and configures[1].downstream_keys == []
    assert configures[10].input_key == keys[0] and configures[11].input_key == keys[0]
    assert configures[10].downstream_keys == [keys[4], keys[5]]
    assert configures[20].input_key == keys[2] and configures[20].downstream_keys == []


def test_without_curve_no_keys_are_named() -> None:
    machine = membership()
    actions: list = []
    for rank in range(4):
        actions += machine.register(identity(rank), register(rank), 1.0)
    for _, message in sends(actions):
        assert message.input_key is None and message.downstream_keys == []
