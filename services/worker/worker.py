"""The distributed worker: owns one servable, its agents, and every request the broker hands it.

States:
  WAITING_FOR_AGENTS  agents register on the agent ROUTER (the distributed address) until every rank is in;
  FORMING_GROUPS      each agent is told its stage, its group's scheduler and where its data comes from;
                      the worker waits for every AGENT_READY and for stage 0 to subscribe to its XPUB;
  SERVING             requests run: Python stages here, the model stage on the agents.
Losing any agent sends the worker back to WAITING_FOR_AGENTS: every request it held is answered UNAVAILABLE,
the remaining agents are told to shut down (a MindSpore process cannot re-join a group), and the groups form
again when the launchers' restarted agents register.

Sockets (who binds is in docs/ARCHITECTURE.md):
  broker       DEALER -> broker's worker ROUTER: WORKER_STATUS every interval, REQUEST in, REPLY out
  agents       ROUTER bound at the distributed address: registration, configuration, heartbeats
  stage_input  XPUB: MODEL_CALL to every stage-0 agent at once; its subscriptions tell who is listening
  results      PULL: MODEL_RESULT / MODEL_ERROR from the last stage
"""

from __future__ import annotations

import math
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import zmq

from services.worker.batching import Batcher
from services.worker.registry import AgentRecord, AgentRegistry, AgentState, StageGroup
from services.worker.requests import MethodRun, ModelCall, RequestTable
from zmserve.codec import (
    decode_instances,
    decode_values,
    dtype_name,
    encode_instances,
    encode_values,
    pack_header,
    unpack_header,
)
from zmserve.logs import get_logger
from zmserve.protocol import (
    DEFAULT_BROKER_WORKER_ADDRESS,
    DEFAULT_DISTRIBUTED_ADDRESS,
    EXECUTION_TIMEOUT_S,
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    MAX_BATCH_DELAY_S,
    MAX_BATCH_SIZE,
    MAX_INFLIGHT_MODEL_CALLS,
    MAX_QUEUED_REQUESTS,
    MODEL_CALL_TOPIC,
    SUBSCRIBER_TOPIC_PREFIX,
    BrokerCommand,
    ErrorCode,
    MessageType,
    ServingError,
    endpoint_host_port,
    normalize_address,
)
from zmserve.ranktable import RankTable
from zmserve.servable import ServableSpec, load_servable
from zmserve.transport import HeartbeatClock, Liveness, drain, new_socket

log = get_logger("worker")
PROGRESS_INTERVAL_S = 5.0
FORMING_TIMEOUT_S = 120.0
"""How long agents may take to join their group and load after configuration (8 agents share 2 cores)."""


class WorkerState(StrEnum):
    WAITING_FOR_AGENTS = "waiting_for_agents"
    FORMING_GROUPS = "forming_groups"
    SERVING = "serving"


class WorkerStartError(RuntimeError):
    """The worker cannot start serving (agents did not come, or do not match the servable)."""


class Worker:
    def __init__(
        self,
        servable_directory: str | Path,
        servable_name: str,
        version_number: int = 1,
        rank_table_json_file: str | Path | None = None,
        distributed_address: str = DEFAULT_DISTRIBUTED_ADDRESS,
        wait_agents_time_in_seconds: float = 0,
        broker_address: str = DEFAULT_BROKER_WORKER_ADDRESS,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        heartbeat_liveness: int = HEARTBEAT_LIVENESS,
        max_inflight_calls: int = MAX_INFLIGHT_MODEL_CALLS,
        max_queued_requests: int = MAX_QUEUED_REQUESTS,
        execution_timeout: float = EXECUTION_TIMEOUT_S,
        max_batch_size: int = MAX_BATCH_SIZE,
        max_batch_delay: float = MAX_BATCH_DELAY_S,
        context: zmq.Context | None = None,
    ) -> None:
        self.spec: ServableSpec = load_servable(servable_directory, servable_name)
        self.log_context = {"servable": servable_name}
        assert self.spec.model is not None
        self.model = self.spec.model
        self.version = version_number
        self.rank_table = RankTable.load(rank_table_json_file, self.model.rank_size) if rank_table_json_file else None
        self.wait_agents_seconds = wait_agents_time_in_seconds
        self.heartbeat_interval, self.heartbeat_liveness = heartbeat_interval, heartbeat_liveness
        self.max_queued_requests = max_queued_requests
        self.execution_timeout = execution_timeout
        self.max_batch_size, self.max_batch_delay = max_batch_size, max_batch_delay

        self.context = context or zmq.Context.instance()
        host, _ = endpoint_host_port(distributed_address)
        self.broker = new_socket(self.context, zmq.DEALER)
        self.broker.connect(normalize_address(broker_address))
        self.agents = new_socket(self.context, zmq.ROUTER, ROUTER_MANDATORY=1)
        self.agents.bind(normalize_address(distributed_address))
        self.stage_input = new_socket(self.context, zmq.XPUB, XPUB_VERBOSE=1, SNDHWM=0)
        self.stage_input_endpoint = f"tcp://{host}:{self.stage_input.bind_to_random_port(f'tcp://{host}')}"
        self.results = new_socket(self.context, zmq.PULL, RCVHWM=0)
        self.results_endpoint = f"tcp://{host}:{self.results.bind_to_random_port(f'tcp://{host}')}"

        self.state = WorkerState.WAITING_FOR_AGENTS
        self.registry = AgentRegistry(self.model)
        self.stages = [StageGroup(k, self.model.ranks_of(k), host) for k in range(self.model.stage_size)]
        self.subscribed_ranks: set[int] = set()
        self.signature: dict[str, Any] = {}
        self.batcher: Batcher | None = None
        self.stats = {"requests": 0, "model_calls": 0, "model_rows": 0}
        self.requests = RequestTable(max_inflight_calls)
        self.broker_liveness = Liveness(heartbeat_interval, heartbeat_liveness)
        self.broker_lost = False
        self.broker_address = normalize_address(broker_address)
        self.heartbeat = HeartbeatClock(heartbeat_interval)
        self.progress = HeartbeatClock(PROGRESS_INTERVAL_S)
        self.waiting_since = self.forming_since = time.monotonic()
        self.last_restart: str | None = None
        """Why the agents were last restarted: part of the not-ready reason clients see."""
        self.stop_event = threading.Event()

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        structlog.contextvars.bind_contextvars(**self.log_context)
        log.info("worker_started", version=self.version, rank_size=self.model.rank_size,
                 stage_size=self.model.stage_size, methods=sorted(self.spec.methods))
        self.start_schedulers()
        handlers = [(self.results, self.process_result), (self.agents, self.process_agent),
                    (self.stage_input, self.process_subscription), (self.broker, self.process_broker)]
        poller = zmq.Poller()
        for sock, _ in handlers:
            poller.register(sock, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                due = self.batcher.seconds_until_due() if self.batcher is not None else None
                ready = dict(poller.poll(timeout=100 if due is None else min(100, math.ceil(due * 1000))))
                for sock, handle in handlers:
                    if sock in ready:
                        drain(sock, handle)
                self.do_chores()
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    # ---- agents: registration and group formation -----------------------------------------------------------
    def process_agent(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        try:
            header = unpack_header(frames[1]) if len(frames) == 2 else None
        except ServingError as error:
            header = None
            log.warning("agent_message_malformed", message=error.message)
        agent = self.registry.by_identity(identity)
        if agent is not None:
            agent.liveness.heard()
        if header is None:
            return
        kind = header["type"]
        if kind == MessageType.AGENT_REGISTER:
            self.register_agent(identity, header)
        elif kind == MessageType.RANK_TABLE_QUERY:
            table = self.rank_table.to_document() if self.rank_table is not None else None
            self.send_to_agent(identity, pack_header(MessageType.RANK_TABLE, table=table,
                                                     rank_size=self.model.rank_size))
        elif agent is None:
            if kind != MessageType.HEARTBEAT:
                log.info("unknown_agent_message", type=kind)
        elif kind == MessageType.AGENT_READY:
            self.agent_ready(agent, header)
        elif kind == MessageType.AGENT_FAILED:
            self.lose_agent(agent, f"agent failed: {header.get('message', '')}")

    def register_agent(self, identity: bytes, header: dict[str, Any]) -> None:
        rank = header.get("rank")
        previous = self.registry.by_rank.get(rank) if isinstance(rank, int) else None
        if previous is not None and previous.identity != identity and (
                self.state != WorkerState.SERVING or header.get("replaces_pid") == previous.pid):
            # The launcher restarted this rank (it names the pid it replaces), or the cluster is still forming,
            # when heartbeats cannot tell a dead agent (MindSpore holds the GIL while it imports and joins).
            previous_exit = header.get("previous_exit")
            self.lose_agent(previous, f"its process {previous.pid} was {previous_exit}" if previous_exit
                            else "its rank registered again from a new process")
        problem = self.registry.check_new(rank)
        retry = problem is not None and isinstance(rank, int) and rank in self.registry.by_rank
        if problem is None and self.state != WorkerState.WAITING_FOR_AGENTS:
            problem, retry = f"the cluster is already complete ({self.state})", True
        if problem is not None:
            log.warning("agent_rejected", agent_rank=rank, why=problem, retry=retry)
            self.send_to_agent(identity, pack_header(MessageType.AGENT_REJECTED, message=problem, retry=retry))
            return
        self.registry.add(AgentRecord(
            rank=rank, identity=identity, host=str(header.get("host")),
            pid=header["pid"] if isinstance(header.get("pid"), int) else 0,
            publish_address=str(header.get("publish_address", "")),
            liveness=Liveness(self.heartbeat_interval, self.heartbeat_liveness),
        ))
        missing = self.registry.missing()
        log.info("agent_registered", agent_rank=rank, host=header.get("host"), pid=header.get("pid"),
                 registered=self.model.rank_size - len(missing), missing=missing,
                 previous_exit=header.get("previous_exit"))
        if not missing:
            self.configure_groups()

    def configure_groups(self) -> None:
        """Tell every agent its stage, its group's scheduler, and where its inputs and outputs go."""
        self.state = WorkerState.FORMING_GROUPS
        self.forming_since = time.monotonic()
        last = len(self.stages) - 1
        for stage in self.stages:
            for rank in stage.ranks:
                agent = self.registry.by_rank[rank]
                leader = rank == stage.leader
                config = {
                    "stage": stage.index,
                    "stage_size": len(self.stages),
                    "node_id": rank - stage.ranks[0],
                    "group_size": len(stage.ranks),
                    "scheduler_host": stage.scheduler_host,
                    "scheduler_port": stage.scheduler_port,
                    "input_address": self.stage_input_endpoint if stage.index == 0
                    else self.registry.by_rank[self.stages[stage.index - 1].leader].publish_address,
                    "result_address": self.results_endpoint,
                    "forward": ("result" if stage.index == last else "publish") if leader else "none",
                    "downstream_ranks": list(self.stages[stage.index + 1].ranks)
                    if leader and stage.index < last else [],
                }
                agent.state = AgentState.CONFIGURED
                self.send_to_agent(agent.identity, pack_header(MessageType.AGENT_CONFIGURE, **config))
        log.info("forming_groups", stages=len(self.stages),
                 schedulers=[f"{s.scheduler_host}:{s.scheduler_port}" for s in self.stages])

    def agent_ready(self, agent: AgentRecord, header: dict[str, Any]) -> None:
        agent.state = AgentState.READY
        agent.signature = header.get("signature") or {}
        log.info("agent_ready", agent_rank=agent.rank, load_seconds=header.get("load_seconds"))
        self.maybe_start_serving()

    def process_subscription(self, frames: list[zmq.Frame]) -> None:
        """XPUB delivers each subscribe (b'\\x01' + topic) and unsubscribe (b'\\x00' + topic)."""
        message = frames[0].bytes
        topic = message[1:]
        if not topic.startswith(SUBSCRIBER_TOPIC_PREFIX):
            return
        try:
            rank = int(topic[len(SUBSCRIBER_TOPIC_PREFIX):])
        except ValueError:
            return
        if message[:1] == b"\x01":
            self.subscribed_ranks.add(rank)
            self.maybe_start_serving()
        else:
            self.subscribed_ranks.discard(rank)

    def maybe_start_serving(self) -> None:
        if self.state != WorkerState.FORMING_GROUPS or not self.registry.all_in(AgentState.READY):
            return
        if not set(self.stages[0].ranks) <= self.subscribed_ranks:
            return
        first = self.registry.by_rank[self.stages[0].leader].signature
        last = self.registry.by_rank[self.stages[-1].leader].signature
        self.signature = {"inputs": first.get("inputs"), "outputs": last.get("outputs")}
        self.check_methods_against_model()
        if self.model.with_batch_dim:
            fixed = (self.signature.get("inputs") or [{"shape": [-1]}])[0]["shape"][0]
            self.batcher = Batcher(self.max_batch_size, self.max_batch_delay, pad_to=fixed if fixed > 0 else None)
        self.state = WorkerState.SERVING
        log.info("serving", seconds_waited=round(time.monotonic() - self.waiting_since, 2))
        self.send_status()

    def check_methods_against_model(self) -> None:
        inputs, outputs = self.signature.get("inputs"), self.signature.get("outputs")
        for method in self.spec.methods.values():
            for stage in method.stages:
                if not stage.is_model:
                    continue
                if inputs is not None and len(stage.inputs) != len(inputs):
                    raise WorkerStartError(
                        f"method {method.name!r} passes {len(stage.inputs)} inputs to the model, which takes "
                        f"{len(inputs)}: {[i['name'] for i in inputs]}"
                    )
                if outputs is not None and stage.outputs_count != len(outputs):
                    raise WorkerStartError(
                        f"method {method.name!r} expects {stage.outputs_count} model outputs, the model has "
                        f"{len(outputs)}"
                    )

    def lose_agent(self, agent: AgentRecord, why: str) -> None:
        log.error("agent_lost", agent_rank=agent.rank, why=why, state=self.state)
        self.registry.remove(agent.rank)
        self.restart_agents(f"agent rank {agent.rank} was lost ({why})")

    def restart_agents(self, why: str) -> None:
        """A group with a lost or stuck member is broken for good (a MindSpore process cannot re-join one):
        answer every request, tell every agent to exit so its launcher starts a fresh one, and wait again."""
        self.fail_all_runs(ErrorCode.UNAVAILABLE, f"{why}; the servable is restarting its agents")
        self.last_restart = why
        shutdown = pack_header(MessageType.AGENT_SHUTDOWN, reason=why)
        for other in list(self.registry.by_rank.values()):
            self.send_to_agent(other.identity, shutdown)
            self.registry.remove(other.rank)
        self.subscribed_ranks.clear()
        for stage in self.stages:
            stage.stop_scheduler()
        self.start_schedulers()
        self.state = WorkerState.WAITING_FOR_AGENTS
        self.waiting_since = time.monotonic()
        self.send_status()

    def start_schedulers(self) -> None:
        for stage in self.stages:
            stage.start_scheduler()

    # ---- broker -> worker: requests -------------------------------------------------------------------------
    def process_broker(self, frames: list[zmq.Frame]) -> None:
        self.broker_liveness.heard()
        command = frames[0].bytes
        if command == BrokerCommand.REQUEST and len(frames) >= 3:
            self.handle_request(frames[1].bytes, frames[2], frames[3:])
        elif command != BrokerCommand.CONTROL:
            log.warning("broker_message_malformed", command=command.hex())

    def handle_request(self, client: bytes, header_frame: zmq.Frame, value_frames: list[zmq.Frame]) -> None:
        request_id = None
        try:
            header = unpack_header(header_frame)
            request_id = header.get("id")
            structlog.contextvars.bind_contextvars(request_id=request_id)
            method = self.spec.methods.get(header.get("method"))
            if method is None:
                raise ServingError(ErrorCode.NOT_FOUND,
                                   f"servable {self.spec.name!r} has no method {header.get('method')!r}; "
                                   f"methods: {sorted(self.spec.methods)}")
            if self.state != WorkerState.SERVING:
                raise ServingError(ErrorCode.UNAVAILABLE, self.status_reason())
            if len(self.requests) >= self.max_queued_requests:
                raise ServingError(ErrorCode.RESOURCE_EXHAUSTED,
                                   f"{len(self.requests)} requests are queued, the limit is {self.max_queued_requests}")
            timeout_ms = header.get("timeout_ms")
            deadline = time.monotonic() + timeout_ms / 1000 if isinstance(timeout_ms, int | float) else None
            instances = decode_instances(header.get("instances"), value_frames)
            run = MethodRun.start(client, request_id, self.spec.name, method, instances, deadline)
            self.requests.add_run(run)
            self.stats["requests"] += 1
        except ServingError as error:
            log.info("request_rejected", code=error.code, message=error.message)
            self.reply_error(client, request_id, error.code, error.message)
            return
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
        self.advance(run)

    def advance(self, run: MethodRun) -> None:
        """Walk a run through its stages until it waits on the model or is done."""
        try:
            while (stage := run.current_stage) is not None:
                if not stage.is_model:
                    run.run_python_stage(stage)
                    continue
                if run.deadline is not None and time.monotonic() >= run.deadline:
                    raise ServingError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed before the model stage")
                self.queue_model_calls(run, run.model_inputs(stage))
                self.publish_calls()
                return
            descriptors, frames = encode_instances(run.results())
        except ServingError as error:
            self.fail_run(run, error.code, error.message)
            return
        except Exception as exc:
            log.exception("request_crashed", request_id=run.request_id)
            self.fail_run(run, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        self.requests.remove_run(run)
        header = pack_header(MessageType.REPLY, id=run.request_id, instances=descriptors)
        self.send_to_broker([BrokerCommand.REPLY, run.client, header, *frames])

    def queue_model_calls(self, run: MethodRun, per_instance: list[list[Any]]) -> None:
        """Check inputs against the model's signature, then queue one call per instance, or hand the instances
        to the batcher when the model has a batch dimension."""
        expected = self.signature.get("inputs") or []
        for index, inputs in enumerate(per_instance):
            for position, value in enumerate(inputs):
                if position < len(expected):
                    check_model_input(index, value, expected[position], self.model.with_batch_dim)
                elif not isinstance(value, np.ndarray):
                    raise ServingError(ErrorCode.INVALID_ARGUMENT, f"instance {index}: model input {position} "
                                                                   "must be a tensor")
        run.awaiting = len(per_instance)
        for index, inputs in enumerate(per_instance):
            if self.batcher is None:
                self.requests.new_call(list(inputs), [(run, index)], batched=False)
            else:
                self.batcher.add((run, index), list(inputs))
        self.flush_batches()

    def flush_batches(self) -> None:
        """Turn every batch that is full or has waited long enough into a model call."""
        if self.batcher is None:
            return
        for batch in self.batcher.take_ready(idle=not self.requests.in_pipeline and not self.requests.queued_calls):
            if any(not run.finished for run, _ in batch.slots):
                self.requests.new_call(batch.inputs, batch.slots, batched=True)

    def publish_calls(self) -> None:
        """Send queued calls while the pipeline has room; PUB never drops because the room is bounded."""
        while (call := self.requests.next_sendable()) is not None:
            descriptors, frames = encode_values({f"input{i}": v for i, v in enumerate(call.inputs)})
            header = pack_header(MessageType.MODEL_CALL, call=call.call_id, request_id=call.slots[0][0].request_id,
                                 values=descriptors)
            self.stage_input.send_multipart([MODEL_CALL_TOPIC, header, *frames], copy=False)
            self.stats["model_calls"] += 1
            self.stats["model_rows"] += len(call.slots)

    # ---- last stage -> worker: results ----------------------------------------------------------------------
    def process_result(self, frames: list[zmq.Frame]) -> None:
        try:
            header = unpack_header(frames[0])
        except ServingError as error:
            log.warning("model_result_malformed", message=error.message)
            return
        call_id = header.get("call")
        call = self.requests.take_result(call_id) if isinstance(call_id, int) else None
        if call is None:
            log.warning("model_result_unmatched", call=call_id, type=header["type"])
            return
        code, message = ErrorCode.INTERNAL, f"rank {header.get('rank')}: {header.get('message')}"
        if header["type"] == MessageType.MODEL_RESULT:
            try:
                self.finish_call(call, list(decode_values(header.get("values"), frames[1:]).values()))
                code = None
            except ServingError as error:
                message = f"the model's result could not be read: {error.message}"
        elif isinstance(header.get("code"), str) and header["code"] in ErrorCode.__members__:
            code = ErrorCode(header["code"])
        if code is not None:
            for run in {run for run, _ in call.slots if not run.finished}:
                self.fail_run(run, code, message)
        self.publish_calls()

    def finish_call(self, call: ModelCall, outputs: list[np.ndarray]) -> None:
        """Hand each row of the result to its run; runs whose last awaited instance this was walk on."""
        for position, (run, index) in enumerate(call.slots):
            if run.finished:
                continue
            try:
                run.finish_model_call(index, [output[position] for output in outputs] if call.batched else outputs)
            except ServingError as error:
                self.fail_run(run, error.code, error.message)
                continue
            except (IndexError, TypeError) as error:
                self.fail_run(run, ErrorCode.INTERNAL, f"the model's batched output does not fit the batch: {error}")
                continue
            if run.awaiting == 0:
                self.advance(run)

    # ---- periodic chores ------------------------------------------------------------------------------------
    def do_chores(self) -> None:
        now = time.monotonic()
        if self.batcher is not None and self.batcher.pending:
            self.flush_batches()
            self.publish_calls()
        for run in self.requests.expired(now):
            self.fail_run(run, ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        if self.state == WorkerState.SERVING:
            for agent in [a for a in self.registry.by_rank.values() if a.liveness.expired(now)]:
                self.lose_agent(agent, f"no heartbeat for {agent.liveness.timeout:.1f} s")
                break
            if self.requests.in_pipeline and now - self.requests.last_progress > self.execution_timeout:
                log.error("model_stuck", seconds=self.execution_timeout, in_pipeline=len(self.requests.in_pipeline))
                self.restart_agents(f"the model made no progress for {self.execution_timeout:.1f} s "
                                    "(execution timeout)")
        elif self.state == WorkerState.FORMING_GROUPS and now - self.forming_since > FORMING_TIMEOUT_S:
            not_ready = [a.rank for a in self.registry.by_rank.values() if a.state != AgentState.READY]
            unsubscribed = sorted(set(self.stages[0].ranks) - self.subscribed_ranks)
            self.restart_agents(f"{FORMING_TIMEOUT_S:.0f} s after configuration, ranks {not_ready} were not ready "
                                f"and ranks {unsubscribed} had not subscribed")
        if self.broker_liveness.expired(now) != self.broker_lost:
            self.broker_lost = not self.broker_lost
            log.warning("broker_lost" if self.broker_lost else "broker_back", broker=self.broker_address)
        if self.heartbeat.due(now):
            self.send_status()
            heartbeat = pack_header(MessageType.HEARTBEAT)
            for agent in list(self.registry.by_rank.values()):
                self.send_to_agent(agent.identity, heartbeat)
        if self.state != WorkerState.SERVING:
            self.report_waiting(now)

    def report_waiting(self, now: float) -> None:
        waited = now - self.waiting_since
        if self.state == WorkerState.WAITING_FOR_AGENTS and self.wait_agents_seconds > 0 \
                and waited > self.wait_agents_seconds:
            raise WorkerStartError(
                f"agents did not register within {self.wait_agents_seconds} s; missing ranks "
                f"{self.registry.missing()}"
            )
        if self.progress.due(now):
            log.info("waiting", state=self.state, reason=self.status_reason(), seconds=round(waited, 1))

    def status_reason(self) -> str:
        restarted = f"; agents restarted because {self.last_restart}" if self.last_restart else ""
        if self.state == WorkerState.WAITING_FOR_AGENTS:
            missing = self.registry.missing()
            return (f"waiting for agents: {self.model.rank_size - len(missing)}/{self.model.rank_size} "
                    f"registered, missing ranks {missing}{restarted}")
        if self.state == WorkerState.FORMING_GROUPS:
            ready = [a.rank for a in self.registry.by_rank.values() if a.state == AgentState.READY]
            return f"forming collective groups: {len(ready)}/{self.model.rank_size} agents ready{restarted}"
        return ""

    # ---- sending --------------------------------------------------------------------------------------------
    def send_status(self) -> None:
        status = pack_header(MessageType.WORKER_STATUS, servable=self.spec.name, version=self.version,
                             methods=sorted(self.spec.methods), ready=self.state == WorkerState.SERVING,
                             reason=self.status_reason())
        self.send_to_broker([BrokerCommand.CONTROL, status])

    def fail_run(self, run: MethodRun, code: ErrorCode, message: str) -> None:
        if run.finished:
            return
        self.requests.remove_run(run)
        log.info("request_failed", request_id=run.request_id, code=code, message=message)
        self.reply_error(run.client, run.request_id, code, message)

    def fail_all_runs(self, code: ErrorCode, message: str) -> None:
        for run in list(self.requests.runs.values()):
            self.fail_run(run, code, message)
        self.requests.forget_pipeline()

    def reply_error(self, client: bytes, request_id: Any, code: ErrorCode, message: str) -> None:
        header = pack_header(MessageType.ERROR, id=request_id, code=str(code), message=message)
        self.send_to_broker([BrokerCommand.REPLY, client, header])

    def send_to_broker(self, frames: list[Any]) -> None:
        """Never block on the broker: if it is gone, the reply is lost and the client's deadline answers."""
        try:
            self.broker.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("broker_unreachable", dropped=MessageType.REPLY if frames[0] == BrokerCommand.REPLY
                        else "status")

    def send_to_agent(self, identity: bytes, header: bytes) -> None:
        try:
            self.agents.send_multipart([identity, header], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("agent_not_reading", identity=identity.hex())
        except zmq.ZMQError as error:
            if error.errno != zmq.EHOSTUNREACH:
                raise

    def shutdown(self) -> None:
        self.fail_all_runs(ErrorCode.UNAVAILABLE, "the worker is shutting down")
        self.send_to_broker([BrokerCommand.CONTROL, pack_header(MessageType.WORKER_DISCONNECT)])
        shutdown = pack_header(MessageType.AGENT_SHUTDOWN, reason="worker stopping")
        for agent in self.registry.by_rank.values():
            self.send_to_agent(agent.identity, shutdown)
        for stage in self.stages:
            stage.stop_scheduler()
        for sock in (self.broker, self.agents, self.stage_input, self.results):
            sock.close(linger=200)
        log.info("worker_stopped", **self.stats)


def check_model_input(instance: int, value: Any, expected: dict[str, Any], batched: bool) -> None:
    """Reject an input the model cannot take before it reaches any agent."""
    name = expected.get("name", "?")
    if not isinstance(value, np.ndarray):
        raise ServingError(ErrorCode.INVALID_ARGUMENT,
                           f"instance {instance}: model input {name!r} must be a tensor, got {type(value).__name__}")
    if dtype_name(value.dtype) != expected["dtype"]:
        raise ServingError(ErrorCode.INVALID_ARGUMENT,
                           f"instance {instance}: model input {name!r} must be {expected['dtype']}, got {value.dtype}")
    shape = expected["shape"][1:] if batched else expected["shape"]
    if len(shape) != value.ndim or any(e >= 0 and e != d for e, d in zip(shape, value.shape, strict=True)):
        raise ServingError(ErrorCode.INVALID_ARGUMENT,
                           f"instance {instance}: model input {name!r} must have shape {tuple(shape)} "
                           f"(-1 = any), got {value.shape}")
