"""What the worker reports about its ranks across a restart, driven through the membership state machine (no
sockets, no MindSpore): states, the processes holding each rank, restarts counted once per new process."""

from __future__ import annotations

import uuid

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from zmserve import metrics
from zmserve.metrics import WorkerMetrics
from zmserve.protocol import AgentRegister, ModelSignature, ShardInfo, TensorSpec
from zmserve.servable import DistributedModel
from zmserve_services.worker.membership import Membership
from zmserve_services.worker.report import MISSING, RESTARTING, AgentHistory

SIGNATURE = ModelSignature([TensorSpec("x", "float32", [4, 8])], [TensorSpec("y", "float32", [4, 8])])


def membership() -> Membership:
    machine = Membership(DistributedModel(4, 2, with_batch_dim=False), heartbeat_interval=1.0, heartbeat_liveness=3,
                         stage_input_address="tcp://127.0.0.1:9000", results_address="tcp://127.0.0.1:9001")
    machine.schedulers_started([("127.0.0.1", 6000), ("127.0.0.1", 6001)], now=0.0)
    return machine


def register(machine: Membership, history: AgentHistory, rank: int, pid: int, now: float,
             replaces: int | None = None) -> bytes:
    identity = f"agent-{rank}-{pid}".encode()
    message = AgentRegister(rank=rank, host=f"host{rank // 2}", pid=pid, model_file=f"d{rank}.mindir",
                            publish_address=f"tcp://127.0.0.1:{7000 + rank}", replaces_pid=replaces,
                            shard=ShardInfo(rank=rank, rank_size=4, stage=rank // 2, stage_size=2,
                                            signature=SIGNATURE))
    machine.register(identity, message, now)
    history.registered(machine, identity, message)
    return identity


def restarts_metric(servable: str) -> dict[str, float]:
    text = generate_latest(metrics.WORKER).decode()
    return {s.labels["rank"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "zmserve_worker_agent_restarts_total" and s.labels["servable"] == servable}


def test_ranks_from_missing_to_ready_to_restarting_and_back() -> None:
    servable = f"report-{uuid.uuid4().hex[:8]}"
    machine, history = membership(), AgentHistory(WorkerMetrics(servable, 1, enabled=True))
    assert [(a.rank, a.stage, a.state) for a in history.agents(machine, 0.0)] == \
        [(0, 0, MISSING), (1, 0, MISSING), (2, 1, MISSING), (3, 1, MISSING)]

    register(machine, history, 0, 100, now=1.0)
    agents = history.agents(machine, now=1.5)
    assert (agents[0].state, agents[0].host, agents[0].pid, agents[0].heartbeat_age) == ("registered", "host0", 100,
                                                                                          0.5)
    assert agents[1].state == MISSING and agents[1].heartbeat_age is None
    for rank in (1, 2, 3):
        register(machine, history, rank, 100 + rank, now=2.0)
    assert {a.state for a in history.agents(machine, 2.0)} == {"configured"}
    for agent in machine.agents.values():
        machine.ready(agent, 1.0)
    machine.subscription(True, 0)
    machine.subscription(True, 1)
    assert {a.state for a in history.agents(machine, 3.0)} == {"ready"}

    # rank 2 dies: its replacement registers naming the lost pid; every rank is told to restart
    register(machine, history, 2, 202, now=4.0, replaces=102)
    agents = history.agents(machine, 4.0)
    assert [(a.state, a.pid, a.restarts) for a in agents] == [
        (RESTARTING, 100, 0), (RESTARTING, 101, 0), ("registered", 202, 1), (RESTARTING, 103, 0)]
    for rank in (0, 1, 3):
        register(machine, history, rank, 200 + rank, now=5.0)
    assert [(a.state, a.pid, a.restarts) for a in history.agents(machine, 5.0)] == \
        [("configured", 200 + rank, 1) for rank in range(4)]
    assert restarts_metric(servable) == {"0": 1, "1": 1, "2": 1, "3": 1}


def test_a_refused_registration_is_not_a_restart() -> None:
    servable = f"report-{uuid.uuid4().hex[:8]}"
    machine, history = membership(), AgentHistory(WorkerMetrics(servable, 1, enabled=True))
    for rank in range(4):
        register(machine, history, rank, 100 + rank, now=1.0)
    for agent in machine.agents.values():
        machine.ready(agent, 1.0)
    machine.subscription(True, 0)
    machine.subscription(True, 1)
    register(machine, history, 1, 999, now=2.0)  # a second launcher's agent for a held rank: refused
    assert [(a.state, a.pid, a.restarts) for a in history.agents(machine, 2.0)] == \
        [("ready", 100 + rank, 0) for rank in range(4)]
    assert restarts_metric(servable) == {}
