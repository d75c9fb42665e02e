"""What a worker reports about itself: the WORKER_STATUS it sends the broker every heartbeat interval (state,
agents rank by rank, load), and the gauges it shows Prometheus.

`Membership` forgets every agent on a restart (a group that lost a member is rebuilt from new processes), so the
history of each rank lives here: the last process that held it, and how many processes registered for it after
its first one (`AgentHistory`). That is how `zmserve status` can show a rank as `restarting` with the pid it
lost, and count its restarts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

from zmserve.metrics import GaugeSample, WorkerMetrics
from zmserve.protocol import AgentRegister, AgentStatus, WorkerStatus
from zmserve_services.worker.membership import AgentState, Membership, WorkerState

if TYPE_CHECKING:
    from zmserve_services.worker.worker import Worker

RESTARTING = "restarting"
"""A rank whose process was lost or told to restart, while no new process has registered for it."""
MISSING = "missing"
"""A rank no process has registered for since the worker started."""
HOST = socket.gethostname()


class AgentHistory:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self.last: dict[int, tuple[str, int]] = {}
        """rank -> (host, pid) of the last process the worker accepted for it."""
        self.restarts: dict[int, int] = {}

    def registered(self, membership: Membership, identity: bytes, message: AgentRegister) -> None:
        """Called after every AGENT_REGISTER: a process the membership accepted for a rank that had another one
        before is a restart."""
        agent = membership.agents.get(message.rank)
        if agent is None or agent.identity != identity:
            return  # refused
        process = (message.host, message.pid)
        previous = self.last.get(message.rank)
        self.last[message.rank] = process
        if previous is not None and previous != process:
            self.restarts[message.rank] = self.restarts.get(message.rank, 0) + 1
            self.metrics.agent_restarted(message.rank)

    def agents(self, membership: Membership, now: float) -> list[AgentStatus]:
        """Every rank of the servable, in rank order."""
        model = membership.model
        statuses = []
        for rank in range(model.rank_size):
            stage, restarts = model.stage_of(rank), self.restarts.get(rank, 0)
            agent = membership.agents.get(rank)
            if agent is not None:
                statuses.append(AgentStatus(rank, stage, agent.state.value, agent.host, agent.pid,
                                            round(now - agent.liveness.last_heard, 3), restarts))
            elif rank in self.last:
                host, pid = self.last[rank]
                statuses.append(AgentStatus(rank, stage, RESTARTING, host, pid, None, restarts))
            else:
                statuses.append(AgentStatus(rank, stage, MISSING))
        return statuses


def worker_status(worker: Worker, now: float) -> WorkerStatus:
    """The WORKER_STATUS of this moment."""
    table = worker.pipeline.table
    draining = worker.drain_state.draining
    reason = f"draining (finishing {len(table)} requests)" if draining else worker.membership.status_reason()
    return WorkerStatus(
        servable=worker.spec.name, version=worker.config.version_number, methods=list(worker.spec.methods),
        ready=worker.state == WorkerState.SERVING and not draining, reason=reason, signatures=worker.signatures,
        draining=draining, retry=worker.spec.retry_on_replica_loss, state=worker.state.value,
        address=worker.config.distributed_address,
        host=HOST, pid=os.getpid(), agents=worker.history.agents(worker.membership, now), requests=len(table),
        queued=queued(worker), calls_in_flight=len(table.in_pipeline))


def queued(worker: Worker) -> int:
    """Instances waiting to go to the model: in a batch being filled, or in a call waiting for room."""
    batcher = worker.pipeline.batcher
    waiting_rows = sum(len(batch.slots) for batch in list(batcher.pending.values())) if batcher else 0
    return len(worker.pipeline.table.queued_calls) + waiting_rows


def worker_gauges(worker: Worker) -> Iterable[GaugeSample]:
    labels = {"servable": worker.spec.name, "version": str(worker.config.version_number)}
    table = worker.pipeline.table
    ready = sum(1 for a in list(worker.membership.agents.values()) if a.state == AgentState.READY)
    yield "zmserve_worker_requests_held", "Requests the worker holds (running or waiting)", labels, len(table)
    yield ("zmserve_worker_queued", "Instances waiting to go to the model (a batch being filled, or a call "
           "waiting for room in the pipeline)", labels, queued(worker))
    yield ("zmserve_worker_model_calls_in_flight", "Model calls published and not answered yet", labels,
           len(table.in_pipeline))
    yield "zmserve_worker_agents_ready", "Agents ready (joined, loaded, warmed up)", labels, ready
    yield "zmserve_worker_agents_expected", "Agents the servable needs (rank_size)", labels, \
        worker.model.rank_size
    yield ("zmserve_worker_serving", "1 while the servable serves, 0 while it waits for agents or forms groups",
           labels, 1 if worker.state == WorkerState.SERVING else 0)
