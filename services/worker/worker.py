"""The distributed worker: owns one servable, its agents, and every request the broker hands it.

One loop (Majordomo style) over four sockets; the rules live elsewhere:
  - `Membership` (membership.py) decides what agent traffic means: who holds which rank, when the groups are
    configured, when the servable serves, when every agent must restart. It returns actions; `carry_out` does
    them.
  - `Pipeline` (pipeline.py) runs requests: Python stages here, the model stage on the agents.
  - this file reads sockets, turns messages into calls on those two, and sends what they give back.

Sockets (who binds is in docs/ARCHITECTURE.md):
  broker       DEALER -> broker's worker ROUTER: WORKER_STATUS every interval, REQUEST in, REPLY out
  agents       ROUTER bound at the distributed address: registration, configuration, heartbeats
  stage_input  XPUB: MODEL_CALL to every stage-0 agent at once; its subscriptions tell who is listening
  results      PULL: MODEL_RESULT / MODEL_ERROR from the agents
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
import zmq

from services.worker.config import WorkerConfig
from services.worker.membership import (
    Action,
    Membership,
    RestartGroups,
    SendToAgent,
    StartServing,
    WorkerState,
)
from services.worker.pipeline import Pipeline
from services.worker.requests import MethodRun
from services.worker.schedulers import StageScheduler
from zmserve.codec import decode_instances
from zmserve.logs import get_logger
from zmserve.loop import Handler, run_services
from zmserve.protocol import (
    MODEL_CALL_TOPIC,
    AgentFailed,
    AgentReady,
    AgentRegister,
    BrokerCommand,
    ErrorCode,
    Heartbeat,
    MethodSignature,
    ModelError,
    ModelResult,
    ModelSignature,
    RankTableAnswer,
    RankTableQuery,
    Request,
    ServingError,
    WorkerDisconnect,
    WorkerStatus,
    deadline_of,
    decode,
    encode,
    endpoint_host_port,
    error_frame,
    normalize_address,
    parse_subscription,
)
from zmserve.ranktable import RankTable
from zmserve.security import Domain, Peer, curve_user
from zmserve.servable import ServableSpec, load_servable, method_signatures
from zmserve.transport import Delivery, HeartbeatClock, Liveness, bind, frame_bytes, new_socket, send_nonblocking

log = get_logger("worker")
PROGRESS_INTERVAL_S = 5.0


class WorkerStartError(RuntimeError):
    """The worker cannot start serving (agents did not come, or do not match the servable)."""


class Worker:
    def __init__(self, config: WorkerConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.spec: ServableSpec = load_servable(config.servable_directory, config.servable_name)
        assert self.spec.model is not None
        self.model = self.spec.model
        self.rank_table = RankTable.load(config.rank_table_file, self.model.rank_size) \
            if config.rank_table_file else None

        self.context = context or zmq.Context.instance()
        host, _ = endpoint_host_port(config.distributed_address)
        self.broker_address = normalize_address(config.broker_address) if config.broker_address else "in-process"
        self.broker: zmq.Socket | None = None
        """The DEALER to a broker in another process; None while a broker in this process is attached."""
        self.in_process_broker: Callable[[list[Any]], None] | None = None
        if config.broker_address:
            self.broker = new_socket(self.context, zmq.DEALER, curve=config.security.client(Peer.BROKER))
            self.broker.connect(self.broker_address)
        agents = config.security.server(Domain.AGENTS)
        self.agents = new_socket(self.context, zmq.ROUTER, curve=agents, ROUTER_MANDATORY=1)
        self.stage_input = new_socket(self.context, zmq.XPUB, curve=agents, XPUB_VERBOSE=1, SNDHWM=0)
        self.results = new_socket(self.context, zmq.PULL, curve=agents, RCVHWM=0)
        try:
            bind(self.agents, normalize_address(config.distributed_address), "worker's distributed address")
            stage_input_endpoint = bind(self.stage_input, f"tcp://{host}:0", "worker's stage-0 publisher")
            results_endpoint = bind(self.results, f"tcp://{host}:0", "worker's results socket")
        except BaseException:
            self.close_sockets()
            raise

        self.membership = Membership(self.model, config.heartbeat_interval, config.heartbeat_liveness,
                                     stage_input_endpoint, results_endpoint)
        self.pipeline = Pipeline(self.model, config.max_inflight_calls, config.max_queued_requests,
                                 publish=self.publish, answer=self.answer)
        self.schedulers = [StageScheduler(host, len(stage.ranks), tls=config.security.collective_tls)
                           for stage in self.membership.stages]
        self.signatures: dict[str, MethodSignature] = {}
        """Each method's inputs and outputs as clients see them, once the agents said what the model takes."""
        self.broker_liveness = Liveness(config.heartbeat_interval, config.heartbeat_liveness)
        self.broker_lost = False
        self.heartbeat = HeartbeatClock(config.heartbeat_interval)
        self.progress = HeartbeatClock(PROGRESS_INTERVAL_S)
        self.waiting_since = time.monotonic()
        self.stop_event = threading.Event()

    @property
    def state(self) -> WorkerState:
        return self.membership.state

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.start()
        try:
            run_services([self], self.stop_event)
        finally:
            self.shutdown()

    def start(self) -> None:
        structlog.contextvars.bind_contextvars(servable=self.spec.name)
        log.info("worker_started", version=self.config.version_number, rank_size=self.model.rank_size,
                 stage_size=self.model.stage_size, methods=sorted(self.spec.methods))
        self.start_schedulers()

    def stop(self) -> None:
        self.stop_event.set()

    def handlers(self) -> list[tuple[zmq.Socket, Handler]]:
        handlers = [(self.results, self.process_result), (self.agents, self.process_agent),
                    (self.stage_input, self.process_subscription)]
        return handlers + ([(self.broker, self.process_broker)] if self.broker is not None else [])

    def poll_timeout(self) -> float:
        due = self.pipeline.seconds_until_due()
        return 0.1 if due is None else min(0.1, due)

    def attach_in_process_broker(self, deliver: Callable[[list[Any]], None]) -> None:
        """A broker in this process and loop (`zmserve serve`): what the worker sends it calls `deliver`."""
        self.in_process_broker = deliver

    # ---- agents: registration and group formation -----------------------------------------------------------
    def process_agent(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        now = time.monotonic()
        agent = self.membership.heard(identity, now)
        if len(frames) != 2:
            log.warning("agent_message_malformed", frames=len(frames))
            return
        try:
            message = decode(frames[1], AgentRegister, AgentReady, AgentFailed, Heartbeat, RankTableQuery)
        except ServingError as error:
            log.warning("agent_message_malformed", message=error.message)
            return
        if isinstance(message, AgentRegister):
            self.carry_out(self.membership.register(identity, message, now, public_key=curve_user(frames[1])))
        elif isinstance(message, RankTableQuery):
            table = self.rank_table.to_document() if self.rank_table is not None else None
            self.send_to_agent(identity, encode(RankTableAnswer(table=table, rank_size=self.model.rank_size)))
        elif agent is None:
            if not isinstance(message, Heartbeat):
                log.info("unknown_agent_message", type=type(message).__name__)
        elif isinstance(message, AgentReady):
            self.carry_out(self.membership.ready(agent, message.load_seconds))
        elif isinstance(message, AgentFailed):
            self.carry_out(self.membership.failed(agent, message.message, now))

    def process_subscription(self, frames: list[zmq.Frame]) -> None:
        """The stage-0 XPUB reports each (un)subscription: a rank subscribed is a rank a publish reaches."""
        event = parse_subscription(frames[0].bytes)
        if event is not None:
            self.carry_out(self.membership.subscription(*event))

    def carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendToAgent):
                self.send_to_agent(action.identity, encode(action.message))
            elif isinstance(action, RestartGroups):
                self.pipeline.fail_all(ErrorCode.UNAVAILABLE, f"{action.why}; the servable is restarting its agents")
                for scheduler in self.schedulers:
                    scheduler.stop()
                self.start_schedulers()
                self.waiting_since = time.monotonic()
                self.send_status()
            elif isinstance(action, StartServing):
                self.check_methods_against_model(action.signature)
                self.signatures = method_signatures(self.spec, action.signature, self.model.with_batch_dim)
                self.pipeline.start(action.signature, self.config.max_batch_size, self.config.max_batch_delay)
                log.info("serving", version=self.config.version_number, rank_size=self.model.rank_size,
                         stage_size=self.model.stage_size,
                         seconds_waited=round(time.monotonic() - self.waiting_since, 2))
                self.send_status()

    def start_schedulers(self) -> None:
        for scheduler in self.schedulers:
            scheduler.start()
        self.membership.schedulers_started([(s.host, s.port) for s in self.schedulers], time.monotonic())

    def check_methods_against_model(self, signature: ModelSignature) -> None:
        inputs, outputs = signature.inputs, signature.outputs
        for method in self.spec.methods.values():
            for stage in method.stages:
                if not stage.is_model:
                    continue
                if inputs is not None and len(stage.inputs) != len(inputs):
                    raise WorkerStartError(
                        f"method {method.name!r} passes {len(stage.inputs)} inputs to the model, which takes "
                        f"{len(inputs)}: {[i.name for i in inputs]}"
                    )
                if outputs is not None and stage.outputs_count != len(outputs):
                    raise WorkerStartError(
                        f"method {method.name!r} expects {stage.outputs_count} model outputs, the model has "
                        f"{len(outputs)}"
                    )

    # ---- broker -> worker: requests -------------------------------------------------------------------------
    def process_broker(self, frames: list[Any]) -> None:
        """[command][...]: from the broker's DEALER link, or straight from a broker in this process."""
        self.broker_liveness.heard()
        command = frame_bytes(frames[0])
        if command == BrokerCommand.REQUEST and len(frames) >= 3:
            self.handle_request(frame_bytes(frames[1]), frames[2], frames[3:])
        elif command != BrokerCommand.CONTROL:
            log.warning("broker_message_malformed", command=command.hex())

    def handle_request(self, client: bytes, header_frame: Any, value_frames: list[Any]) -> None:
        request_id = None
        try:
            request = decode(header_frame, Request)
            request_id = request.id
            method = self.spec.methods.get(request.method)
            if method is None:
                raise ServingError(ErrorCode.NOT_FOUND,
                                   f"servable {self.spec.name!r} has no method {request.method!r}; "
                                   f"methods: {sorted(self.spec.methods)}")
            if self.state != WorkerState.SERVING:
                raise ServingError(ErrorCode.UNAVAILABLE, self.membership.status_reason())
            self.pipeline.check_room()
            instances = decode_instances(request.instances, value_frames)
            run = MethodRun.start(client, request.id, self.spec.name, method, instances,
                                  deadline_of(request.timeout_ms))
            self.pipeline.admit(run)
        except ServingError as error:
            log.info("request_rejected", request_id=request_id, code=error.code, message=error.message)
            self.answer(client, [error_frame(request_id, error.code, error.message)])

    # ---- last stage -> worker: results ----------------------------------------------------------------------
    def process_result(self, frames: list[zmq.Frame]) -> None:
        try:
            message = decode(frames[0], ModelResult, ModelError)
        except ServingError as error:
            log.warning("model_result_malformed", message=error.message)
            return
        self.pipeline.take_result(message, frames[1:])

    # ---- periodic chores ------------------------------------------------------------------------------------
    def do_chores(self) -> None:
        now = time.monotonic()
        self.pipeline.do_chores(now)
        if self.state == WorkerState.SERVING and self.pipeline.stuck_for(now) > self.config.execution_timeout:
            log.error("model_stuck", seconds=self.config.execution_timeout,
                      in_pipeline=len(self.pipeline.table.in_pipeline))
            self.carry_out(self.membership.restart(
                f"the model made no progress for {self.config.execution_timeout:.1f} s (execution timeout)", now))
        self.carry_out(self.membership.tick(now))
        if self.broker_liveness.expired(now) != self.broker_lost:
            self.broker_lost = not self.broker_lost
            log.warning("broker_lost" if self.broker_lost else "broker_back", broker=self.broker_address)
        if self.heartbeat.due(now):
            self.send_status()
            heartbeat = encode(Heartbeat())
            for agent in list(self.membership.agents.values()):
                self.send_to_agent(agent.identity, heartbeat)
        if self.state != WorkerState.SERVING:
            self.report_waiting(now)

    def report_waiting(self, now: float) -> None:
        waited = now - self.waiting_since
        wait_limit = self.config.wait_agents_seconds
        if self.state == WorkerState.WAITING_FOR_AGENTS and 0 < wait_limit < waited:
            raise WorkerStartError(f"agents did not register within {wait_limit} s; missing ranks "
                                   f"{self.membership.missing()}")
        if self.progress.due(now):
            log.info("waiting", state=self.state, reason=self.membership.status_reason(), seconds=round(waited, 1))

    # ---- sending --------------------------------------------------------------------------------------------
    def send_status(self) -> None:
        status = WorkerStatus(servable=self.spec.name, version=self.config.version_number,
                              methods=list(self.spec.methods), ready=self.state == WorkerState.SERVING,
                              reason=self.membership.status_reason(), signatures=self.signatures)
        self.send_to_broker([BrokerCommand.CONTROL, encode(status)])

    def publish(self, frames: list[Any]) -> None:
        """A model call to every stage-0 agent (the pipeline bounds what is in flight, so this never drops)."""
        self.stage_input.send_multipart([MODEL_CALL_TOPIC, *frames], copy=False)

    def answer(self, client: bytes, frames: list[Any]) -> None:
        """A REPLY or ERROR for a client, through the broker."""
        self.send_to_broker([BrokerCommand.REPLY, client, *frames])

    def send_to_broker(self, frames: list[Any]) -> None:
        """Never block on the broker: if it is gone, the reply is lost and the client's deadline answers."""
        if self.in_process_broker is not None:
            self.in_process_broker(frames)
        elif self.broker is not None and send_nonblocking(self.broker, frames) is not Delivery.SENT:
            log.warning("broker_unreachable", dropped="reply" if frames[0] == BrokerCommand.REPLY else "status")

    def send_to_agent(self, identity: bytes, header: bytes) -> None:
        if send_nonblocking(self.agents, [identity, header]) is Delivery.WOULD_BLOCK:
            log.warning("agent_not_reading", identity=identity.hex())

    def shutdown(self) -> None:
        self.pipeline.fail_all(ErrorCode.UNAVAILABLE, "the worker is shutting down")
        self.send_to_broker([BrokerCommand.CONTROL, encode(WorkerDisconnect())])
        self.carry_out(self.membership.stop("worker stopping"))
        for scheduler in self.schedulers:
            scheduler.stop()
        self.close_sockets(linger=200)
        log.info("worker_stopped", **self.pipeline.stats)

    def close_sockets(self, linger: int = 0) -> None:
        for sock in (self.broker, self.agents, self.stage_input, self.results):
            if sock is not None:
                sock.close(linger=linger)
