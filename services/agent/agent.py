"""One agent process: one rank, one model shard, one member of its stage's MindSpore collective group.

Two threads, so heartbeats flow while a model call runs:
  - `ControlLink` (a thread) owns the control DEALER to the worker: registration, heartbeats both ways, the
    configuration, shutdown. The main thread hands it messages through an inproc PAIR.
  - the main thread owns MindSpore and the data plane (`DataPlane`): it reads a call from its SUB, runs the
    shard, and sends the output on (PUSH to the worker from the last stage's leader, XPUB to the next stage
    from other stage leaders). A call crosses no thread boundary inside the agent.

Lifecycle: REGISTER -> (worker) CONFIGURE -> join group, load, warm up -> READY -> model calls ... The process
exits with EXIT_RESTART when the worker says shut down or goes silent (its launcher starts a fresh one: a
MindSpore process cannot re-join a group), EXIT_REJECTED when the worker refuses its rank for good (the reason
goes to the launcher through `reason_fd`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog
import zmq

from zmserve import trace as tracing
from zmserve.codec import decode_values, encode_values
from zmserve.collective import ShardModel, import_mindspore, join_group
from zmserve.collective_tls import CollectiveTls
from zmserve.endpoints import normalize_address
from zmserve.logs import Bursts, configure_logging, flush_bursts, get_logger
from zmserve.protocol import (
    MODEL_CALL_TOPIC,
    AgentConfigure,
    AgentFailed,
    AgentReady,
    AgentRegister,
    AgentRejected,
    AgentShutdown,
    ErrorCode,
    Forward,
    Heartbeat,
    Message,
    ModelCall,
    ModelError,
    ModelResult,
    ServingError,
    decode,
    encode,
    parse_subscription,
    subscription_topic,
)
from zmserve.security import (
    PLAINTEXT,
    CurveClient,
    CurveServer,
    Domain,
    Handshake,
    Peer,
    Refusal,
    Security,
    send_unless_refused,
)
from zmserve.standby import STANDBY_FLAG, wait_for_activation
from zmserve.supervision import die_with_parent, name_process
from zmserve.transport import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    RECONNECT_MIN_MS,
    BindError,
    HeartbeatClock,
    Liveness,
    bind,
    new_socket,
    read_pending,
    recv_frames,
    send_frames,
)
from zmserve_services.agent.state import SequenceStates, StateSpec
from zmserve_services.agent.status_pipe import report_loaded
from zmserve_services.agent.subgraphs import Subgraph, read_subgraphs, subgraph_files

EXIT_STOPPED = 0
EXIT_CRASHED = 1
EXIT_REJECTED = 2
EXIT_RESTART = 3
JOIN_TIMEOUT_S = 90.0
"""Longest an agent may take to join its group, load and warm up (8 agents on 2 cores take ~10-40 s)."""
LAST_MESSAGE_MS = 100
"""How long an exiting agent gives its last control message to leave."""
DOWNSTREAM_WAIT_S = 60.0
"""How long a stage leader waits for the next stage to subscribe before it reports a failed start."""

log = get_logger("agent")
bursts = Bursts(log)


class AgentSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What the launcher tells one agent process, passed as JSON in its only argument (the launcher read its own
    options, flags or ZMSERVE_* variables, through click; the agent has no option parser of its own)."""

    worker: str
    rank: int
    model_file: str
    publish_address: str
    host: str = "127.0.0.1"
    group_config_file: str | None = None
    replaces_pid: int | None = None
    previous_exit: str | None = None
    """Why the previous process of this rank ended, as its launcher saw it (sent on to the worker)."""
    status_fd: int | None = None
    """A pipe to the launcher, written once the shard is loaded (so the launcher can tell a death while loading)."""
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    reason_fd: int | None = None
    """A pipe to the launcher: why this agent was rejected for good, so the launcher can say it as its error."""
    secret_key: str | None = None
    """CURVE: this machine's key pair (the launcher's --secret-key file; a path, so no key is on a command line)."""
    worker_key: str | None = None
    """CURVE: the worker's public key file (the launcher's --worker-key)."""
    collective_tls: str | None = None
    """MindSpore's TLS inside the stage's group: the launcher's --collective-tls folder."""

    def security(self) -> Security:
        return Security.load(self.secret_key, servers={Peer.WORKER: self.worker_key})

    def to_argument(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_argument(cls, text: str) -> AgentSettings:
        return msgspec.json.decode(text, type=cls)


class ControlLink(threading.Thread):
    """The agent's control link to the worker, in its own thread. The configuration arrives on `inbox`;
    shutdown, rejection and a silent worker end the process from here, even while the main thread is stuck
    in a collective whose peer is gone."""

    def __init__(self, context: zmq.Context, worker_address: str, rank: int,
                 heartbeat_interval: float, heartbeat_liveness: int, reason_fd: int | None = None,
                 curve: CurveClient | None = None) -> None:
        super().__init__(name=f"agent-control-{rank}", daemon=True)
        self.context = context
        self.curve = dataclasses.replace(curve, watch=False) if curve is not None else None
        self.worker_address = worker_address
        self.rank = rank
        self.reason_fd = reason_fd
        self.inbox: queue.Queue[AgentConfigure] = queue.Queue()
        pipe = f"inproc://agent-control-{rank}"
        self.from_main = new_socket(context, zmq.PAIR)
        self.from_main.bind(pipe)
        self.to_link = new_socket(context, zmq.PAIR)
        self.to_link.connect(pipe)
        self.heartbeat = HeartbeatClock(heartbeat_interval)
        self.worker_liveness = Liveness(heartbeat_interval, heartbeat_liveness)
        self.worker_heard = False
        self.registered = False
        """AGENT_REGISTER has left: heartbeats only follow it (a worker answers a heartbeat from an agent it does not
        know with AGENT_SHUTDOWN, so a heartbeat that overtook the registration would restart a healthy agent)."""

    def send(self, message: Message) -> None:
        """Called from the main thread: a control message for the worker."""
        self.to_link.send_multipart([b"send", encode(message)])

    def send_and_exit(self, message: Message, code: int) -> None:
        """Called from the main thread: send a last message, then end the process from the link's thread (so
        the message leaves before the process does)."""
        self.to_link.send_multipart([b"exit", encode(message), str(code).encode()])
        self.join()

    def run(self) -> None:
        structlog.contextvars.bind_contextvars(rank=self.rank)
        try:
            self.control = new_socket(self.context, zmq.DEALER, curve=self.curve)
            self.handshake = Handshake(self.control, self.curve is not None)
            self.control.connect(self.worker_address)
            poller = zmq.Poller()
            poller.register(self.control, zmq.POLLIN)
            poller.register(self.from_main, zmq.POLLIN)
            poller.register(self.handshake.monitor, zmq.POLLIN)
            while True:
                poller.poll(timeout=100)
                # The worker's silence is judged as of before the drain: MindSpore calls in the main thread (load,
                # compile, joining a group) take the GIL for seconds whenever pyzmq releases it, and heartbeats
                # that arrive meanwhile wait unread; only what had arrived by `now` counts.
                now = time.monotonic()
                if (refusal := self.handshake.read()) is not None:
                    self.refused(refusal)
                read_pending(self.control, self.handle_control)
                read_pending(self.from_main, self.handle_main)
                self.do_chores(now)
        except Exception:
            log.exception("agent_control_crashed")
            os._exit(EXIT_CRASHED)

    def refused(self, refusal: Refusal) -> None:
        """libzmq does not retry a refused handshake: exit, and the launcher retries after its backoff."""
        log.error("agent_refused", worker=self.worker_address, why=refusal.value)
        self.exit(EXIT_CRASHED)

    def handle_main(self, frames: list[zmq.Frame]) -> None:
        kind = frames[0].bytes
        if (refusal := send_unless_refused(self.control, [frames[1]], self.handshake)) is not None:
            self.refused(refusal)
        self.registered = True  # the main thread's first message is AGENT_REGISTER
        if kind == b"exit":
            self.exit(int(frames[2].bytes), last_message_sent=True)

    def handle_control(self, frames: list[zmq.Frame]) -> None:
        self.worker_liveness.heard()
        self.worker_heard = True
        try:
            message = decode(frames[-1], AgentConfigure, AgentRejected, AgentShutdown, Heartbeat)
        except ServingError as error:
            log.warning("control_message_malformed", message=error.message)
            return
        if isinstance(message, AgentConfigure):
            self.inbox.put(message)
        elif isinstance(message, AgentRejected):
            if message.retry:
                log.warning("agent_rejected", why=message.message, retry=True)
                self.exit(EXIT_CRASHED)
            log.info("agent_rejected", why=message.message, retry=False)  # the launcher says why, as its error
            self.exit(EXIT_REJECTED, reason=f"the worker at {self.worker_address} refused it: {message.message}")
        elif isinstance(message, AgentShutdown):
            log.debug("agent_shutdown", reason=message.reason)  # the worker logged why, once
            self.exit(EXIT_RESTART)

    def do_chores(self, now: float) -> None:
        flush_bursts()
        if self.registered and self.heartbeat.due():
            with contextlib.suppress(zmq.Again):
                self.control.send(encode(Heartbeat(rank=self.rank)), flags=zmq.NOBLOCK)
        if self.worker_heard and self.worker_liveness.expired(now):
            log.warning("worker_lost", reason=f"no heartbeat for {self.worker_liveness.timeout:.1f} s")
            self.exit(EXIT_RESTART)

    def exit(self, code: int, reason: str | None = None, last_message_sent: bool = False) -> None:
        """End the process without MindSpore's exit hooks, which can wait on a group that is gone. os._exit also
        skips the ZeroMQ context's termination, which is what waits for a closed socket's unsent messages: a last
        message (AGENT_FAILED) is given the linger time to leave."""
        self.control.close(linger=LAST_MESSAGE_MS)
        if last_message_sent:
            time.sleep(LAST_MESSAGE_MS / 1000)
        if reason is not None:
            report_reason(self.reason_fd, reason)
        flush_bursts(final=True)
        sys.stderr.flush()
        os._exit(code)


class DataPlane:
    """Where this agent's calls come from and where its outputs go; used by the main thread only."""

    def __init__(self, context: zmq.Context, config: AgentConfigure, rank: int, publish_address: str,
                 security: Security = PLAINTEXT) -> None:
        self.forward = config.forward
        to_worker = security.client(Peer.WORKER)  # CURVE on every data link when the control link has it
        from_leader = to_worker if to_worker is None or config.input_key is None else dataclasses.replace(
            to_worker, server_key=config.input_key.encode(), link="previous stage's leader")
        # the previous stage's leader binds its XPUB only once its own group has formed, maybe seconds after this
        # connect: retry every RECONNECT_MIN_MS instead of backing off to seconds (a restart would wait for it)
        self.inputs = new_socket(context, zmq.SUB, curve=from_leader, RCVHWM=0, RECONNECT_IVL_MAX=RECONNECT_MIN_MS)
        self.inputs.connect(config.input_address)
        self.inputs.setsockopt(zmq.SUBSCRIBE, MODEL_CALL_TOPIC)
        self.inputs.setsockopt(zmq.SUBSCRIBE, subscription_topic(rank))
        self.results = new_socket(context, zmq.PUSH, curve=to_worker, SNDHWM=0)
        self.results.connect(config.result_address)
        self.downstream: zmq.Socket | None = None
        if self.forward == Forward.PUBLISH:
            next_stage = None if to_worker is None else CurveServer(
                to_worker.keys, Domain.DOWNSTREAM, frozenset(key.encode() for key in config.downstream_keys))
            self.downstream = new_socket(context, zmq.XPUB, curve=next_stage, XPUB_VERBOSE=1, SNDHWM=0)
            bind(self.downstream, publish_address, f"publish socket of rank {rank} (--agent-start-port + its position)")

    def wait_for_downstream(self, ranks: list[int], timeout: float) -> list[int]:
        """Wait until every rank of the next stage subscribed (a PUB drops what it sends before); returns the
        ranks still missing at the deadline."""
        missing = set(ranks)
        deadline = time.monotonic() + timeout
        while missing and self.downstream is not None and time.monotonic() < deadline:
            if self.downstream.poll(100):
                event = parse_subscription(self.downstream.recv())
                if event is not None and event[0]:
                    missing.discard(event[1])
        return sorted(missing)

    def receive(self) -> list[zmq.Frame]:
        """The next call: [header, *values] (the topic frame dropped)."""
        return recv_frames(self.inputs)[1:]

    def send_output(self, frames: list[Any]) -> None:
        if self.forward == Forward.PUBLISH and self.downstream is not None:
            send_frames(self.downstream, [MODEL_CALL_TOPIC, *frames])
        elif self.forward == Forward.RESULT:
            send_frames(self.results, frames)

    def send_error(self, error: ModelError) -> None:
        self.results.send(encode(error))


class ShardRunner:
    """The MindSpore side: join the stage's group, load this rank's MindIR files (one per subgraph), run calls,
    keep the state of stateful subgraphs' sequences (state.py)."""

    def __init__(self, subgraphs: list[Subgraph], tls: CollectiveTls | None = None) -> None:
        import_mindspore()
        self.subgraphs = subgraphs
        self.tls = tls
        self.shards: list[ShardModel] = []
        self.states: dict[StateSpec, SequenceStates] = {}
        """One store per state layout: subgraphs that name the same state share their sequences' arrays."""

    def join_group_and_load(self, config: AgentConfigure) -> None:
        # init() holds the GIL while it waits for its group, so the control thread cannot act on a shutdown
        # meanwhile; faulthandler's watchdog is a C thread that ends the process if joining takes too long.
        faulthandler.dump_traceback_later(JOIN_TIMEOUT_S, exit=True)
        try:
            started = time.monotonic()
            join_group(config.scheduler_host, config.scheduler_port, config.group_size, config.node_id, self.tls)
            log.debug("group_joined", seconds=round(time.monotonic() - started, 3))
            started = time.monotonic()
            self.shards = [ShardModel.load(subgraph.file) for subgraph in self.subgraphs]
            for subgraph in self.subgraphs:
                if subgraph.state is not None and subgraph.state not in self.states:
                    self.states[subgraph.state] = SequenceStates(subgraph.state, config.max_sequences)
            log.debug("shard_loaded", seconds=round(time.monotonic() - started, 3), subgraphs=len(self.shards))
            started = time.monotonic()
            for index, subgraph in enumerate(self.subgraphs):
                if subgraph.signature.inputs:
                    self.warm_up(index)
            log.debug("warmed_up", seconds=round(time.monotonic() - started, 3))
        finally:
            faulthandler.cancel_dump_traceback_later()

    def warm_up(self, index: int) -> None:
        """One call on zeros of the subgraph's shapes (-1 as 1; one sequence of zero state), so the first real
        call does not pay for compiling the graph."""
        subgraph = self.subgraphs[index]
        assert subgraph.signature.inputs is not None
        inputs = [np.zeros([d if d >= 0 else 1 for d in spec.shape], dtype=spec.dtype)
                  for spec in subgraph.signature.inputs]
        if subgraph.state is not None:
            inputs.append(np.expand_dims(np.zeros(subgraph.state.shape, subgraph.state.dtype),
                                         subgraph.state.batch_axis))
        self.shards[index].run(inputs)

    def run(self, inputs: list[np.ndarray], subgraph: int = 0, sequences: list[int] | None = None,
            release: list[int] | tuple[int, ...] = ()) -> list[np.ndarray]:
        """Free `release`, then run `subgraph` on `inputs` (rows of a stateful one belong to `sequences`)."""
        assert self.shards, "run before join_group_and_load"
        for states in self.states.values():
            states.release(list(release))
        if not inputs:
            return []
        if not 0 <= subgraph < len(self.shards):
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"the model has no subgraph {subgraph}; it has "
                                                           f"{len(self.shards)}")
        spec = self.subgraphs[subgraph].state
        if spec is None:
            return self.shards[subgraph].run(inputs)
        if sequences is None or not inputs or len(sequences) != len(inputs[0]):
            raise ServingError(ErrorCode.INVALID_ARGUMENT,
                               f"subgraph {subgraph} is stateful: each batch row needs its sequence id")
        states = self.states[spec]
        names = [tensor.name for tensor in self.subgraphs[subgraph].signature.inputs or []]
        positions = inputs[names.index(spec.positions)] if spec.positions in names else None
        if positions is None:
            raise ServingError(ErrorCode.INTERNAL, f"subgraph {subgraph}: no input named {spec.positions!r}")
        outputs = self.shards[subgraph].run([*inputs, states.batch(sequences)])
        states.update(sequences, np.asarray(positions).reshape(-1), outputs[-1])
        return outputs[:-1]

    @property
    def state_bytes(self) -> int:
        return sum(states.bytes for states in self.states.values())


def report_reason(reason_fd: int | None, reason: str) -> None:
    """Tell the launcher why this agent is rejected for good (one line it prints as its own error)."""
    if reason_fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(reason_fd, reason.encode()[:4000])


def serve(settings: AgentSettings) -> int:
    files = subgraph_files(settings.model_file)
    if not files or (missing := [str(f) for f in files if not f.is_file()]):
        log.error("model_file_missing", path=settings.model_file)
        report_reason(settings.reason_fd, f"its model file {','.join(missing) or settings.model_file} does not exist")
        return EXIT_REJECTED
    try:
        shard, subgraphs = read_subgraphs(files, Path(settings.group_config_file) if settings.group_config_file
                                          else None)
    except ValueError as exc:
        log.error("group_config_invalid", why=str(exc))
        report_reason(settings.reason_fd, str(exc))
        return EXIT_REJECTED
    security = settings.security()
    context = zmq.Context()
    link = ControlLink(context, normalize_address(settings.worker), settings.rank, settings.heartbeat_interval,
                       settings.heartbeat_liveness, settings.reason_fd, security.client(Peer.WORKER))
    link.start()
    link.send(AgentRegister(rank=settings.rank, host=settings.host, pid=os.getpid(), model_file=settings.model_file,
                            publish_address=settings.publish_address, replaces_pid=settings.replaces_pid,
                            previous_exit=settings.previous_exit, shard=shard))
    log.debug("agent_registering", worker=settings.worker, model_file=settings.model_file)
    tls = CollectiveTls.load(settings.collective_tls) if settings.collective_tls else None
    started = time.monotonic()
    runner = ShardRunner(subgraphs, tls)
    log.debug("mindspore_imported", seconds=round(time.monotonic() - started, 3))
    config = link.inbox.get()
    log.debug("agent_configured", scheduler=f"{config.scheduler_host}:{config.scheduler_port}")
    structlog.contextvars.bind_contextvars(stage=config.stage)
    started = time.monotonic()
    try:
        runner.join_group_and_load(config)
        data = DataPlane(context, config, settings.rank, settings.publish_address, security)
        missing = data.wait_for_downstream(config.downstream_ranks, DOWNSTREAM_WAIT_S)
        if missing:
            raise RuntimeError(f"next-stage ranks {missing} did not subscribe within {DOWNSTREAM_WAIT_S:.0f} s")
    except BindError as exc:
        log.error("agent_load_failed", why=str(exc))
        link.send_and_exit(AgentFailed(message=str(exc)), EXIT_RESTART)
    except Exception as exc:
        log.exception("agent_load_failed")
        link.send_and_exit(AgentFailed(message=f"{type(exc).__name__}: {exc}"), EXIT_RESTART)
    seconds = round(time.monotonic() - started, 2)
    log.debug("agent_loaded", seconds=seconds, forward=data.forward)
    report_loaded(settings.status_fd)
    link.send(AgentReady(rank=settings.rank, load_seconds=seconds))
    while True:
        run_call(runner, data, data.receive(), settings.rank)


def run_call(runner: ShardRunner, data: DataPlane, frames: list[zmq.Frame], rank: int) -> None:
    call_id, call = None, None
    arrived = tracing.now()
    try:
        call = decode(frames[0], ModelCall)
        call_id = call.call
        inputs = list(decode_values(call.values, frames[1:]).values())
        stamps = None if call.trace is None else [*call.trace, (tracing.AGENT_IN, arrived)]
        tracing.stamp(stamps, tracing.MODEL_START)
        outputs = runner.run(inputs, call.subgraph, call.sequences, call.release)
        tracing.stamp(stamps, tracing.MODEL_END)
    except Exception as exc:
        code = exc.code if isinstance(exc, ServingError) else ErrorCode.INTERNAL
        bursts.warning("model_call_failed", call=call_id, error=str(exc))
        data.send_error(ModelError(call=call_id, rank=rank, code=code, message=f"{type(exc).__name__}: {exc}"))
        if call is not None and call.release and data.forward == Forward.PUBLISH:
            # the next stages free these sequences too, though this call goes no further
            data.send_output([encode(ModelCall(call=call.call, rank=rank, values=[], release=call.release))])
        return
    if data.forward == Forward.NONE or (not call.values and data.forward == Forward.RESULT):
        return  # a call that only releases has no result
    specs, out_frames = encode_values({f"input{i}": v for i, v in enumerate(outputs)})
    tracing.stamp(stamps, tracing.AGENT_OUT)
    if data.forward == Forward.PUBLISH:
        header = encode(ModelCall(call=call.call, rank=rank, request_id=call.request_id, values=specs,
                                  subgraph=call.subgraph, sequences=call.sequences, release=call.release,
                                  trace=stamps))
    else:
        header = encode(ModelResult(call=call.call, rank=rank, request_id=call.request_id, values=specs,
                                    trace=stamps))
    data.send_output([header, *out_frames])


def process_name(rank: int, standby: bool = False) -> str:
    """What `ps` shows for an agent process (a standby's command line stays what it was started with)."""
    return f"zms-{'spare' if standby else 'agent'}-r{rank}"


def rank_of_process_name(name: str | None) -> int | None:
    """The rank of an active agent from its process name (None for a standby or any other process)."""
    prefix = process_name(0).removesuffix("0")
    return int(name.removeprefix(prefix)) if name and name.startswith(prefix) and name[len(prefix):].isdigit() \
        else None


def wait_as_standby(settings: AgentSettings) -> AgentSettings | None:
    """A standby agent (started by its launcher ahead of need): import MindSpore now, then wait for the settings of
    the process it is to become; None when the launcher retires it instead."""
    name_process(process_name(settings.rank, standby=True))
    started = time.monotonic()
    import_mindspore()
    log.debug("standby_ready", pid=os.getpid(), seconds=round(time.monotonic() - started, 3))
    line = wait_for_activation()
    return AgentSettings.from_argument(line) if line is not None else None


def main(argv: list[str] | None = None) -> None:
    die_with_parent()
    arguments = argv if argv is not None else sys.argv[1:]
    settings = AgentSettings.from_argument(arguments[-1])
    configure_logging()
    structlog.contextvars.bind_contextvars(rank=settings.rank)
    try:
        if arguments[0] == STANDBY_FLAG:
            activated = wait_as_standby(settings)
            if activated is None:
                os._exit(EXIT_STOPPED)
            settings = activated
        name_process(process_name(settings.rank))
        code = serve(settings)
        sys.stderr.flush()
    except KeyboardInterrupt:
        code = EXIT_STOPPED
    except Exception:
        log.exception("agent_crashed")
        code = EXIT_CRASHED
    flush_bursts(final=True)
    os._exit(code)


if __name__ == "__main__":
    main()
