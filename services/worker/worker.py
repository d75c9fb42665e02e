"""The distributed worker: owns one servable, its agents, and every request the broker hands it.

One loop (Majordomo style) over four sockets; the rules live elsewhere:
  - `Membership` (membership.py) decides what agent traffic means: who holds which rank, when the groups are
    configured, when the servable serves, when every agent must restart. It returns actions; `carry_out` does
    them.
  - `Pipeline` (pipeline.py) runs requests: Python stages here, the model stage on the agents.
  - `Drain` (drain.py) is the graceful stop on SIGTERM: take nothing new, finish what is held, then stop.
  - this file reads sockets, turns messages into calls on those two, and sends what they give back.

Model calls leave once per loop turn (`release_calls`), after the broker has been told which requests they start
(REQUESTS_STARTED): the broker sends a request to another replica only while it has not reached a model.

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
from dataclasses import dataclass, replace
from typing import Any

import structlog
import zmq

from zmserve import trace as tracing
from zmserve.codec import decode_instances
from zmserve.endpoints import endpoint_host_port, normalize_address
from zmserve.logs import Bursts, get_logger
from zmserve.loop import SCAN_INTERVAL_S, Handler, run_loop
from zmserve.metrics import WorkerMetrics
from zmserve.protocol import (
    MODEL_CALL_TOPIC,
    SHUTDOWN_GRACE_S,
    AgentExited,
    AgentFailed,
    AgentReady,
    AgentRegister,
    AgentRejected,
    AgentShutdown,
    AgentsShutDown,
    AgentStopped,
    BrokerCommand,
    Cancel,
    DrainAck,
    ErrorCode,
    Heartbeat,
    LauncherHello,
    MethodSignature,
    ModelError,
    ModelResult,
    RankTableAnswer,
    RankTableQuery,
    Request,
    RequestId,
    RequestsStarted,
    ServingError,
    StoppedAgent,
    WorkerDisconnect,
    deadline_of,
    decode,
    encode,
    error_frame,
    parse_subscription,
)
from zmserve.ranktable import RankTable
from zmserve.readiness import Readiness
from zmserve.security import Domain, Peer, curve_user
from zmserve.servable import ServableSpec, load_servable, method_signatures
from zmserve.transport import (
    Delivery,
    HeartbeatClock,
    Liveness,
    bind,
    data_endpoint,
    frame_bytes,
    new_socket,
    read_pending,
    send_frames,
    send_nonblocking,
)
from zmserve.versions import foreign_version, resolve_version
from zmserve_services.worker.config import WorkerConfig
from zmserve_services.worker.drain import Drain
from zmserve_services.worker.launchers import Launchers
from zmserve_services.worker.membership import (
    Action,
    Membership,
    ModelUse,
    RestartGroups,
    SendToAgent,
    StartServing,
    WorkerState,
)
from zmserve_services.worker.pipeline import Pipeline
from zmserve_services.worker.report import AgentHistory, worker_gauges, worker_status
from zmserve_services.worker.requests import MethodRun
from zmserve_services.worker.schedulers import StageScheduler
from zmserve_services.worker.stage_threads import StageThreads

log = get_logger("worker")
bursts = Bursts(log)
"""Events that may come once per request or message: counted and summarised (logs.Bursts), never a line each."""
PROGRESS_INTERVAL_S = 30.0
"""How often a worker that is not serving says what it waits for (once at once, then at this interval)."""


@dataclass(frozen=True)
class InProcessBroker:
    """A broker in this process and loop (`zmserve serve`): the worker calls it instead of sending to it."""

    take_reply: Callable[[bytes, RequestId | None, str, list[Any]], None]
    """(client, request id, code, [header, *values]): an answer, with its request id and its code ("OK" or an
    error code) so the broker need not decode it."""
    process_worker: Callable[[list[Any]], None]
    """Any other message, as the frames the DEALER would have sent ([command, ...])."""
    requests_started: Callable[[list[tuple[bytes, Any]]], None] | None = None
    """REQUESTS_STARTED as the (client, request id) pairs, not encoded."""


class WorkerStartError(RuntimeError):
    """The worker cannot start serving (its agents did not come within --wait-agents)."""


class Worker:
    def __init__(self, config: WorkerConfig, context: zmq.Context | None = None) -> None:
        config = replace(config, version_number=resolve_version(config.servable_directory, config.servable_name,
                                                                config.version_number))
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
        self.in_process_broker: InProcessBroker | None = None
        if config.broker_address:
            self.broker = new_socket(self.context, zmq.DEALER, curve=config.security.client(Peer.BROKER))
            self.broker.connect(self.broker_address)
        agents = config.security.server(Domain.AGENTS)
        self.agents = new_socket(self.context, zmq.ROUTER, curve=agents, ROUTER_MANDATORY=1)
        self.stage_input = new_socket(self.context, zmq.XPUB, curve=agents, XPUB_VERBOSE=1, SNDHWM=0)
        self.results = new_socket(self.context, zmq.PULL, curve=agents, RCVHWM=0)
        try:
            bind(self.agents, normalize_address(config.distributed_address), "worker's distributed address")
            stage_input_endpoint = bind(self.stage_input, data_endpoint(host, "stage0"), "worker's stage-0 publisher")
            results_endpoint = bind(self.results, data_endpoint(host, "results"), "worker's results socket")
        except BaseException:
            self.close_sockets()
            raise

        self.membership = Membership(self.model, config.heartbeat_interval, config.heartbeat_liveness,
                                     stage_input_endpoint, results_endpoint, servable=self.spec.name,
                                     uses=ModelUse.of(self.spec), max_sequences=config.max_sequences)
        self.metrics = WorkerMetrics(self.spec.name, config.version_number, config.metrics,
                                     gauges=lambda: worker_gauges(self))
        self.history = AgentHistory(self.metrics)
        self.stage_threads = StageThreads(self.context)
        """Python stages that call the model run on threads of their own (stage_threads.py)."""
        self.pipeline = Pipeline(self.model, config.max_inflight_calls, config.max_queued_requests,
                                 publish=self.publish, answer=self.answer, metrics=self.metrics,
                                 start_stage=self.stage_threads.start, max_sequences=config.max_sequences,
                                 step_wait=config.max_batch_delay,
                                 partial=self.send_partial)
        self.schedulers = [StageScheduler(host, len(stage.ranks), tls=config.security.collective_tls,
                                          keeps_standby=config.standby_schedulers)
                           for stage in self.membership.stages]
        self.launchers = Launchers(config.heartbeat_interval, config.heartbeat_liveness)
        self.signatures: dict[str, MethodSignature] = {}
        """Each method's inputs and outputs as clients see them, once the agents said what the model takes."""
        self.broker_liveness = Liveness(config.heartbeat_interval, config.heartbeat_liveness)
        self.broker_lost = False
        self.heartbeat = HeartbeatClock(config.heartbeat_interval)
        self.scan = HeartbeatClock(SCAN_INTERVAL_S)
        self.progress = HeartbeatClock(PROGRESS_INTERVAL_S)
        self.waiting_since = time.monotonic()
        self.stop_event = threading.Event()
        self.drain_state = Drain(config.drain_timeout)
        self.readiness = Readiness(config.ready_file)
        self.outbox: list[list[Any]] = []
        """Model calls published this loop turn, sent by `release_calls` after the broker is told."""

    @property
    def state(self) -> WorkerState:
        return self.membership.state

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        run_loop([self], self.stop_event)

    def start(self) -> None:
        structlog.contextvars.bind_contextvars(servable=self.spec.name)
        log.info("worker_started", version=self.config.version_number, rank_size=self.model.rank_size,
                 stage_size=self.model.stage_size, methods=sorted(self.spec.methods))
        self.start_schedulers()

    def stop(self) -> None:
        self.stop_event.set()

    def drain(self) -> None:
        """Stop gracefully (SIGTERM): finish what is held first (drain.py). Safe in a signal handler."""
        self.drain_state.request()

    def handlers(self) -> list[tuple[zmq.Socket, Handler]]:
        handlers = [(self.results, self.process_result), (self.agents, self.process_agent),
                    (self.stage_input, self.process_subscription), (self.stage_threads.wake, self.process_stages)]
        return handlers + ([(self.broker, self.process_broker)] if self.broker is not None else [])

    def poll_timeout(self) -> float:
        due = self.pipeline.seconds_until_due()
        return 0.1 if due is None else min(0.1, due)

    def attach_in_process_broker(self, broker: InProcessBroker) -> None:
        """A broker in this process and loop (`zmserve serve`): what the worker sends it is a call."""
        self.in_process_broker = broker

    # ---- agents: registration and group formation -----------------------------------------------------------
    def process_agent(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        now = time.monotonic()
        agent = self.membership.heard(identity, now)
        if len(frames) != 2:
            bursts.warning("agent_message_malformed", frames=len(frames))
            return
        try:
            message = decode(frames[1], AgentRegister, AgentReady, AgentFailed, AgentStopped, Heartbeat,
                             RankTableQuery, LauncherHello, AgentExited)
        except ServingError as error:
            bursts.warning("agent_message_malformed", message=error.message)
            return
        self.launchers.heard(identity, now)
        if isinstance(message, LauncherHello):
            self.launchers.hello(identity, message, now)
        elif isinstance(message, AgentExited):
            self.carry_out(self.membership.exited(message.rank, message.pid, message.why, now))
        elif isinstance(message, AgentRegister):
            if (other := foreign_version(message.model_file, self.spec.name, self.config.version_number)) is not None:
                self.reject_other_version(identity, message, other)
                return
            self.carry_out(self.membership.register(identity, message, now, public_key=curve_user(frames[1])))
            self.history.registered(self.membership, identity, message)
        elif isinstance(message, RankTableQuery):
            table = self.rank_table.to_document() if self.rank_table is not None else None
            self.send_to_agent(identity, encode(RankTableAnswer(table=table, rank_size=self.model.rank_size)))
        elif isinstance(message, AgentStopped):  # from the agent's launcher
            self.carry_out(self.membership.stopped(message.rank, message.pid, message.reason, now))
        elif agent is None:
            if isinstance(message, Heartbeat) and message.rank is not None:
                # an agent of a worker that restarted (or one this worker gave up on): it cannot serve here
                # without a new group, so it starts again now rather than after its 3 s of silence
                log.info("unknown_agent_told_to_restart", agent_rank=message.rank)
                self.send_to_agent(identity, encode(AgentShutdown(
                    reason="this worker does not know this agent (the worker restarted, or gave it up)")))
            elif not isinstance(message, Heartbeat):
                bursts.info("unknown_agent_message", type=type(message).__name__)
        elif isinstance(message, AgentReady):
            self.carry_out(self.membership.ready(agent, message.load_seconds))
        elif isinstance(message, AgentFailed):
            self.carry_out(self.membership.failed(agent, message.message, now))

    def process_stages(self, frames: list[zmq.Frame]) -> None:
        """Stage threads want model calls, yielded, or ended (stage_threads.py)."""
        self.pipeline.stage_events(self.stage_threads.take_events(frames))

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
                self.metrics.groups_restarted()
                self.pipeline.fail_all(ErrorCode.UNAVAILABLE, f"{action.why}; the servable is restarting its agents")
                self.tell_launchers(action.stopped, action.why)
                self.outbox.clear()
                self.readiness.set_not_ready(f"restarting its agents: {action.why}")
                for scheduler in self.schedulers:
                    scheduler.stop()
                self.start_schedulers()
                self.waiting_since = time.monotonic()
                self.send_status()
            elif isinstance(action, StartServing):
                self.signatures = method_signatures(self.spec, action.signature, self.model.with_batch_dim)
                self.pipeline.start(action.signature, self.config.max_batch_size, self.config.max_batch_delay,
                                    list(action.subgraphs))
                self.metrics.groups_formed(time.monotonic() - self.membership.since)
                for scheduler in self.schedulers:
                    scheduler.keep_standby()
                log.info("serving", version=self.config.version_number, rank_size=self.model.rank_size,
                         stage_size=self.model.stage_size,
                         seconds_waited=round(time.monotonic() - self.waiting_since, 2))
                if not self.drain_state.draining:
                    self.readiness.set_ready(f"serving {self.spec.name} version {self.config.version_number}")
                self.send_status()

    def tell_launchers(self, stopped: tuple[tuple[int, int], ...], why: str) -> None:
        """Every launcher ends those of these agent processes that are its own and still run after the grace."""
        if not stopped:
            return
        message = encode(AgentsShutDown(agents=[StoppedAgent(rank, pid) for rank, pid in stopped], reason=why,
                                        grace_s=SHUTDOWN_GRACE_S))
        for identity in self.launchers.alive(time.monotonic()):
            self.send_to_agent(identity, message)

    def start_schedulers(self) -> None:
        for scheduler in self.schedulers:
            scheduler.start()
        self.carry_out(self.membership.schedulers_started([(s.host, s.port) for s in self.schedulers],
                                                          time.monotonic()))

    # ---- broker -> worker: requests -------------------------------------------------------------------------
    def process_broker(self, frames: list[Any]) -> None:
        """[command][...]: from the broker's DEALER link, or straight from a broker in this process."""
        self.broker_liveness.heard()
        command = frame_bytes(frames[0])
        if command == BrokerCommand.REQUEST and len(frames) >= 3:
            self.handle_request(frame_bytes(frames[1]), frames[2], frames[3:])
        elif command == BrokerCommand.CANCEL and len(frames) == 3:
            self.cancel_request(frame_bytes(frames[1]), frames[2])
        elif command == BrokerCommand.CONTROL and len(frames) >= 2:
            self.process_broker_control(frames[1])
        elif command != BrokerCommand.CONTROL:
            bursts.warning("broker_message_malformed", command=command.hex())

    def process_broker_control(self, frame: Any) -> None:
        """HEARTBEAT (counted as traffic above) or DRAIN_ACK: the broker routes this draining worker nothing more."""
        try:
            message = decode(frame, Heartbeat, DrainAck)
        except ServingError as error:
            bursts.warning("broker_message_malformed", message=error.message)
            return
        if isinstance(message, DrainAck) and self.drain_state.draining and not self.drain_state.acknowledged:
            self.drain_state.acknowledged = True
            log.info("drain_acknowledged", held=len(self.pipeline.table))

    def handle_request(self, client: bytes, header_frame: Any, value_frames: list[Any]) -> None:
        try:
            request = decode(header_frame, Request)
        except ServingError as error:
            bursts.info("request_rejected", key=error.code, request_id=None, code=error.code, message=error.message)
            self.metrics.rejected(None, error.code)
            self.answer(client, None, error.code, [error_frame(None, error.code, error.message)])
            return
        self.take_request(client, request, value_frames)

    def take_request(self, client: bytes, request: Request, value_frames: list[Any]) -> None:
        """A decoded request (from the DEALER through `handle_request`, or from a broker in this process)."""
        method = None
        tracing.stamp(request.trace, tracing.WORKER_IN)
        try:
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
                                  deadline_of(request.timeout_ms), stream=request.stream)
            run.trace = request.trace
            self.pipeline.admit(run)
        except ServingError as error:
            bursts.info("request_rejected", key=error.code, request_id=request.id, code=error.code,
                        message=error.message)
            self.metrics.rejected(method.name if method is not None else None, error.code)
            self.answer(client, request.id, error.code, [error_frame(request.id, error.code, error.message)])

    def cancel_request(self, client: bytes, header_frame: Any) -> None:
        """The client gave up (the broker has answered it CANCELLED): drop the request, or discard its result."""
        try:
            cancel = decode(header_frame, Cancel)
        except ServingError as error:
            log.warning("broker_message_malformed", message=error.message)
            return
        self.pipeline.cancel(client, cancel.id)

    # ---- last stage -> worker: results ----------------------------------------------------------------------
    def process_result(self, frames: list[zmq.Frame]) -> None:
        try:
            message = decode(frames[0], ModelResult, ModelError)
        except ServingError as error:
            bursts.warning("model_result_malformed", message=error.message)
            return
        self.pipeline.take_result(message, frames[1:])

    # ---- periodic chores ------------------------------------------------------------------------------------
    def do_chores(self) -> None:
        now = time.monotonic()
        if self.scan.due(now):
            self.scan_chores(now)
        else:
            self.pipeline.send_due_batches()
        self.pipeline.step_generators()
        self.release_calls()

    def scan_chores(self, now: float) -> None:
        """Deadlines, liveness, heartbeats, the drain: at most every SCAN_INTERVAL_S while busy."""
        self.pipeline.do_chores(now)
        if self.state == WorkerState.SERVING and self.pipeline.stuck_for(now) > self.config.execution_timeout:
            log.error("model_stuck", seconds=self.config.execution_timeout,
                      in_pipeline=len(self.pipeline.table.in_pipeline))
            self.carry_out(self.membership.restart(
                f"the model made no progress for {self.config.execution_timeout:.1f} s (execution timeout)", now))
        self.carry_out(self.membership.tick(now))
        if self.broker_liveness.expired(now) and not self.broker_lost and self.broker is not None:
            read_pending(self.broker, self.process_broker)  # a loop stalled after its read must not judge by it
        if self.broker_liveness.expired(now) != self.broker_lost:
            self.broker_lost = not self.broker_lost
            log.warning("broker_lost" if self.broker_lost else "broker_back", broker=self.broker_address)
        if self.heartbeat.due(now):
            self.send_status()
            heartbeat = encode(Heartbeat())
            for agent in list(self.membership.agents.values()):
                self.send_to_agent(agent.identity, heartbeat)
            for identity in self.launchers.alive(now):
                self.send_to_agent(identity, heartbeat)
        if self.state != WorkerState.SERVING and not self.drain_state.draining:
            self.report_waiting(now)
        self.check_drain(now)

    def check_drain(self, now: float) -> None:
        """Begin a requested drain (tell the broker and the supervisor), and stop the loop when it is over."""
        if self.drain_state.begin(now):
            log.info("draining", held=len(self.pipeline.table), timeout=self.config.drain_timeout)
            self.readiness.stopping(f"draining: finishing {len(self.pipeline.table)} requests")
            self.send_status()
        broker_reachable = self.in_process_broker is not None or not self.broker_lost
        why = self.drain_state.done(now, len(self.pipeline.table), broker_reachable)
        if why is not None:
            held = len(self.pipeline.table)
            (log.warning if held else log.info)("drained", why=why, held=held,
                                                seconds=round(now - self.drain_state.since, 2))
            self.stop_event.set()

    def report_waiting(self, now: float) -> None:
        waited = max(0.0, now - self.waiting_since)  # a restart in this turn set waiting_since after `now`
        wait_limit = self.config.wait_agents_seconds
        if self.state == WorkerState.WAITING_FOR_AGENTS and 0 < wait_limit < waited:
            raise WorkerStartError(f"agents did not register within {wait_limit} s; missing ranks "
                                   f"{self.membership.missing()}")
        if self.progress.due(now):
            log.info("waiting", state=self.state, reason=self.membership.status_reason(), seconds=round(waited, 1))

    # ---- sending --------------------------------------------------------------------------------------------
    def send_status(self) -> None:
        self.send_to_broker([BrokerCommand.CONTROL, encode(worker_status(self, time.monotonic()))])

    def publish(self, frames: list[Any]) -> None:
        """A model call for every stage-0 agent, sent at the end of this loop turn (`release_calls`)."""
        self.outbox.append(frames)

    def release_calls(self) -> None:
        """Tell the broker which requests reach the model now, then publish their calls: in this order, a worker
        that dies in between has published nothing the broker does not know about (PROTOCOL.md §4.10). The
        pipeline bounds what is in flight, so a publish never drops."""
        if self.pipeline.started:
            started, self.pipeline.started = self.pipeline.started, []
            if self.in_process_broker is not None and self.in_process_broker.requests_started is not None:
                self.in_process_broker.requests_started(started)
            else:
                clients, ids = zip(*started, strict=True)
                self.send_to_broker([BrokerCommand.CONTROL, encode(RequestsStarted(clients=list(clients),
                                                                                   ids=list(ids)))])
        if self.outbox:
            outbox, self.outbox = self.outbox, []
            for frames in outbox:
                send_frames(self.stage_input, [MODEL_CALL_TOPIC, *frames])

    def answer(self, client: bytes, request_id: RequestId | None, code: str, frames: list[Any]) -> None:
        """A REPLY (code "OK") or ERROR ([header, *values]) for request `request_id` of a client, through the
        broker."""
        if self.in_process_broker is not None:
            self.in_process_broker.take_reply(client, request_id, code, frames)
        else:
            self.send_to_broker([BrokerCommand.REPLY, client, *frames])

    def send_partial(self, client: bytes, frames: list[Any]) -> None:
        """A PARTIAL ([header, *values]) of a streamed request, on the reply path: the broker forwards it and keeps
        the request open (a broker in this process reads it as the DEALER's frames)."""
        self.send_to_broker([BrokerCommand.REPLY, client, *frames])

    def send_to_broker(self, frames: list[Any]) -> None:
        """Never block on the broker: if it is gone, the reply is lost and the client's deadline answers."""
        if self.in_process_broker is not None:
            self.in_process_broker.process_worker(frames)
        elif self.broker is not None and send_nonblocking(self.broker, frames) is not Delivery.SENT:
            bursts.warning("broker_unreachable", dropped="reply" if frames[0] == BrokerCommand.REPLY else "status")

    def send_to_agent(self, identity: bytes, header: bytes) -> None:
        if send_nonblocking(self.agents, [identity, header]) is Delivery.WOULD_BLOCK:
            bursts.warning("agent_not_reading", identity=identity.hex())

    def reject_other_version(self, identity: bytes, message: AgentRegister, other: int) -> None:
        """A shard from another version's folder: refused for good, its launcher exits with the reason."""
        reason = (f"the shard {message.model_file} is version {other} of servable {self.spec.name!r}; this worker "
                  f"serves version {self.config.version_number}: point its launcher at that version's worker")
        log.warning("agent_refused", agent_rank=message.rank, why=reason)
        self.send_to_agent(identity, encode(AgentRejected(message=reason, retry=False)))

    def shutdown(self) -> None:
        self.outbox.clear()
        self.readiness.withdraw()
        self.pipeline.fail_all(ErrorCode.UNAVAILABLE, "the worker is shutting down")
        self.send_to_broker([BrokerCommand.CONTROL, encode(WorkerDisconnect())])
        self.tell_launchers(tuple((a.rank, a.pid) for a in self.membership.agents.values()), "worker stopping")
        self.carry_out(self.membership.stop("worker stopping"))
        for scheduler in self.schedulers:
            scheduler.close()
        self.close_sockets(linger=200)
        log.info("worker_stopped", **self.pipeline.stats)

    def close_sockets(self, linger: int = 0) -> None:
        for sock in (self.broker, self.agents, self.stage_input, self.results):
            if sock is not None:
                sock.close(linger=linger)
        if hasattr(self, "stage_threads"):  # not yet when a bind failed in __init__
            self.stage_threads.close()
