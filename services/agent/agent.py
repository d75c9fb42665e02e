"""One agent process: one rank, one model shard, one member of its stage's MindSpore collective group.

Two threads, so heartbeats flow while a model call runs:
  - `ControlLink` (a thread) owns the control DEALER to the worker: registration, heartbeats both ways, the
    configuration, shutdown. The main thread hands it messages through an inproc PAIR.
  - the main thread owns MindSpore and the data plane (`DataPlane`): it reads a call from its SUB, runs the
    shard, and sends the output on (PUSH to the worker from the last stage's leader, XPUB to the next stage
    from other stage leaders). A call crosses no thread boundary inside the agent.

Lifecycle: REGISTER -> (worker) CONFIGURE -> join group, load, warm up -> READY -> model calls ... The process
exits with EXIT_RESTART when the worker says shut down or goes silent (its launcher starts a fresh one: a
MindSpore process cannot re-join a group), EXIT_REJECTED when the worker refuses its rank.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import zmq

from services.agent.status_pipe import report_loaded
from zmserve.codec import decode_values, encode_values, pack_header, unpack_header
from zmserve.collective import MEMBER_ROLE, group_environment
from zmserve.logs import configure_logging, get_logger
from zmserve.protocol import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    MODEL_CALL_TOPIC,
    SUBSCRIBER_TOPIC_PREFIX,
    ErrorCode,
    MessageType,
    ServingError,
    normalize_address,
)
from zmserve.supervision import die_with_parent
from zmserve.transport import HeartbeatClock, Liveness, drain, new_socket

EXIT_STOPPED = 0
EXIT_CRASHED = 1
EXIT_REJECTED = 2
EXIT_RESTART = 3
JOIN_TIMEOUT_S = 90.0
"""Longest an agent may take to join its group, load and warm up (8 agents on 2 cores take ~10-40 s)."""
DOWNSTREAM_WAIT_S = 60.0
"""How long a stage leader waits for the next stage to subscribe before it reports a failed start."""

log = get_logger("agent")


class ControlLink(threading.Thread):
    """The agent's control link to the worker, in its own thread. The configuration arrives on `inbox`;
    shutdown, rejection and a silent worker end the process from here, even while the main thread is stuck
    in a collective whose peer is gone."""

    def __init__(self, context: zmq.Context, worker_address: str, rank: int,
                 heartbeat_interval: float, heartbeat_liveness: int) -> None:
        super().__init__(name=f"agent-control-{rank}", daemon=True)
        self.context = context
        self.worker_address = worker_address
        self.rank = rank
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        pipe = f"inproc://agent-control-{rank}"
        self.from_main = new_socket(context, zmq.PAIR)
        self.from_main.bind(pipe)
        self.to_link = new_socket(context, zmq.PAIR)
        self.to_link.connect(pipe)
        self.heartbeat = HeartbeatClock(heartbeat_interval)
        self.worker_liveness = Liveness(heartbeat_interval, heartbeat_liveness)
        self.worker_heard = False

    def send(self, header: bytes) -> None:
        """Called from the main thread: a control message for the worker."""
        self.to_link.send_multipart([b"send", header])

    def send_and_exit(self, header: bytes, code: int) -> None:
        """Called from the main thread: send a last message, then end the process from the link's thread (so
        the message leaves before the process does)."""
        self.to_link.send_multipart([b"exit", header, str(code).encode()])
        self.join()

    def run(self) -> None:
        structlog.contextvars.bind_contextvars(rank=self.rank)
        try:
            self.control = new_socket(self.context, zmq.DEALER)
            self.control.connect(self.worker_address)
            poller = zmq.Poller()
            poller.register(self.control, zmq.POLLIN)
            poller.register(self.from_main, zmq.POLLIN)
            while True:
                poller.poll(timeout=100)
                # The worker's silence is judged as of before the drain: MindSpore calls in the main thread (load,
                # compile, joining a group) take the GIL for seconds whenever pyzmq releases it, and heartbeats
                # that arrive meanwhile wait unread; only what had arrived by `now` counts.
                now = time.monotonic()
                drain(self.control, self.handle_control)
                drain(self.from_main, self.handle_main)
                self.do_chores(now)
        except Exception:
            log.exception("agent_control_crashed")
            os._exit(EXIT_CRASHED)

    def handle_main(self, frames: list[zmq.Frame]) -> None:
        kind = frames[0].bytes
        self.control.send(frames[1].bytes)
        if kind == b"exit":
            self.exit(int(frames[2].bytes))

    def handle_control(self, frames: list[zmq.Frame]) -> None:
        self.worker_liveness.heard()
        self.worker_heard = True
        try:
            header = unpack_header(frames[-1])
        except ServingError as error:
            log.warning("control_message_malformed", message=error.message)
            return
        kind = header["type"]
        if kind == MessageType.AGENT_CONFIGURE:
            self.inbox.put(header)
        elif kind == MessageType.AGENT_REJECTED:
            retry = bool(header.get("retry"))
            log.error("agent_rejected", why=header.get("message"), retry=retry)
            self.exit(EXIT_CRASHED if retry else EXIT_REJECTED)
        elif kind == MessageType.AGENT_SHUTDOWN:
            log.info("agent_shutdown", reason=header.get("reason"))
            self.exit(EXIT_RESTART)

    def do_chores(self, now: float) -> None:
        if self.heartbeat.due():
            with contextlib.suppress(zmq.Again):
                self.control.send(pack_header(MessageType.HEARTBEAT, rank=self.rank), flags=zmq.NOBLOCK)
        if self.worker_heard and self.worker_liveness.expired(now):
            log.warning("worker_lost", reason=f"no heartbeat for {self.worker_liveness.timeout:.1f} s")
            self.exit(EXIT_RESTART)

    def exit(self, code: int) -> None:
        """End the process without MindSpore's exit hooks, which can wait on a group that is gone."""
        self.control.close(linger=100)
        sys.stderr.flush()
        os._exit(code)


class DataPlane:
    """Where this agent's calls come from and where its outputs go; used by the main thread only."""

    def __init__(self, context: zmq.Context, config: dict[str, Any], rank: int, publish_address: str) -> None:
        self.forward = config["forward"]
        self.inputs = new_socket(context, zmq.SUB, RCVHWM=0)
        self.inputs.connect(config["input_address"])
        self.inputs.setsockopt(zmq.SUBSCRIBE, MODEL_CALL_TOPIC)
        self.inputs.setsockopt(zmq.SUBSCRIBE, SUBSCRIBER_TOPIC_PREFIX + str(rank).encode())
        self.results = new_socket(context, zmq.PUSH, SNDHWM=0)
        self.results.connect(config["result_address"])
        self.downstream: zmq.Socket | None = None
        if self.forward == "publish":
            self.downstream = new_socket(context, zmq.XPUB, XPUB_VERBOSE=1, SNDHWM=0)
            self.downstream.bind(publish_address)

    def wait_for_downstream(self, ranks: list[int], timeout: float) -> list[int]:
        """Wait until every rank of the next stage subscribed (a PUB drops what it sends before); returns the
        ranks still missing at the deadline."""
        missing = set(ranks)
        deadline = time.monotonic() + timeout
        while missing and self.downstream is not None and time.monotonic() < deadline:
            if self.downstream.poll(100):
                message = self.downstream.recv()
                if message[:1] == b"\x01" and message[1:].startswith(SUBSCRIBER_TOPIC_PREFIX):
                    missing.discard(int(message[1 + len(SUBSCRIBER_TOPIC_PREFIX):]))
        return sorted(missing)

    def receive(self) -> list[zmq.Frame]:
        """The next call: [header, *values] (the topic frame dropped)."""
        return self.inputs.recv_multipart(copy=False)[1:]

    def send_output(self, frames: list[Any]) -> None:
        if self.forward == "publish" and self.downstream is not None:
            self.downstream.send_multipart([MODEL_CALL_TOPIC, *frames], copy=False)
        elif self.forward == "result":
            self.results.send_multipart(frames, copy=False)

    def send_error(self, header: bytes) -> None:
        self.results.send(header)


class ShardRunner:
    """The MindSpore side: join the stage's group, load this rank's MindIR, run calls."""

    def __init__(self, model_file: Path, signature: dict[str, Any]) -> None:
        import mindspore as ms

        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device("CPU")
        self.ms = ms
        self.model_file = model_file
        self.signature = signature
        self.cell: Any = None

    def join_group_and_load(self, config: dict[str, Any]) -> None:
        os.environ.update(group_environment(MEMBER_ROLE, config["scheduler_host"], config["scheduler_port"],
                                            config["group_size"], config["node_id"]))
        from mindspore.communication import init

        # init() holds the GIL while it waits for its group, so the control thread cannot act on a shutdown
        # meanwhile; faulthandler's watchdog is a C thread that ends the process if joining takes too long.
        faulthandler.dump_traceback_later(JOIN_TIMEOUT_S, exit=True)
        try:
            init()
            self.cell = self.ms.nn.GraphCell(self.ms.load(str(self.model_file)))
            if self.signature.get("inputs"):
                self.run([np.zeros([d if d >= 0 else 1 for d in spec["shape"]], dtype=spec["dtype"])
                          for spec in self.signature["inputs"]])
        finally:
            faulthandler.cancel_dump_traceback_later()

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        returned = self.cell(*(self.ms.Tensor(np.asarray(value)) for value in inputs))
        outputs = returned if isinstance(returned, tuple | list) else (returned,)
        return [output.asnumpy() for output in outputs]


def read_signature(model_file: Path, group_config_file: Path | None) -> dict[str, Any]:
    """The shard's input/output signature from its group config (written by the export), if there is one."""
    path = group_config_file or model_file.parent / "group_config.json"
    if not path.is_file():
        return {}
    document = json.loads(path.read_text())
    return {"inputs": document.get("inputs"), "outputs": document.get("outputs")}


def serve(args: argparse.Namespace) -> int:
    model_file = Path(args.model_file)
    if not model_file.is_file():
        log.error("model_file_missing", path=str(model_file))
        return EXIT_REJECTED
    signature = read_signature(model_file, Path(args.group_config_file) if args.group_config_file else None)
    context = zmq.Context()
    link = ControlLink(context, normalize_address(args.worker), args.rank, args.heartbeat_interval,
                       args.heartbeat_liveness)
    link.start()
    link.send(pack_header(MessageType.AGENT_REGISTER, rank=args.rank, host=args.host, pid=os.getpid(),
                          model_file=str(model_file), publish_address=args.publish_address,
                          replaces_pid=args.replaces_pid, previous_exit=args.previous_exit))
    log.info("agent_registering", worker=args.worker, model_file=str(model_file))
    runner = ShardRunner(model_file, signature)
    config = link.inbox.get()
    structlog.contextvars.bind_contextvars(stage=config["stage"])
    started = time.monotonic()
    try:
        runner.join_group_and_load(config)
        data = DataPlane(context, config, args.rank, args.publish_address)
        missing = data.wait_for_downstream(config["downstream_ranks"], DOWNSTREAM_WAIT_S)
        if missing:
            raise RuntimeError(f"next-stage ranks {missing} did not subscribe within {DOWNSTREAM_WAIT_S:.0f} s")
    except Exception as exc:
        log.exception("agent_load_failed")
        link.send_and_exit(pack_header(MessageType.AGENT_FAILED, message=f"{type(exc).__name__}: {exc}"),
                           EXIT_RESTART)
    seconds = round(time.monotonic() - started, 2)
    log.info("agent_loaded", seconds=seconds, forward=data.forward)
    report_loaded(args.status_fd)
    link.send(pack_header(MessageType.AGENT_READY, rank=args.rank, signature=signature, load_seconds=seconds))
    while True:
        run_call(runner, data, data.receive(), args.rank)


def run_call(runner: ShardRunner, data: DataPlane, frames: list[zmq.Frame], rank: int) -> None:
    call_id = None
    try:
        header = unpack_header(frames[0])
        call_id = header.get("call")
        inputs = list(decode_values(header.get("values"), frames[1:]).values())
        outputs = runner.run(inputs)
    except Exception as exc:
        code = exc.code if isinstance(exc, ServingError) else ErrorCode.INTERNAL
        log.warning("model_call_failed", call=call_id, error=str(exc))
        data.send_error(pack_header(MessageType.MODEL_ERROR, call=call_id, rank=rank, code=str(code),
                                    message=f"{type(exc).__name__}: {exc}"))
        return
    if data.forward == "none":
        return
    descriptors, out_frames = encode_values({f"input{i}": v for i, v in enumerate(outputs)})
    kind = MessageType.MODEL_CALL if data.forward == "publish" else MessageType.MODEL_RESULT
    data.send_output([pack_header(kind, call=call_id, rank=rank, request_id=header.get("request_id"),
                                  values=descriptors), *out_frames])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="one zmserve agent process (started by `zmserve agent`)")
    parser.add_argument("--worker", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--model-file", required=True)
    parser.add_argument("--group-config-file")
    parser.add_argument("--host", default=socket.gethostname())
    parser.add_argument("--publish-address", required=True)
    parser.add_argument("--replaces-pid", type=int, default=None,
                        help="the pid of the agent this one restarts (lets the worker replace it at once)")
    parser.add_argument("--previous-exit", default=None,
                        help="why the previous process of this rank died (from the launcher; sent to the worker)")
    parser.add_argument("--status-fd", type=int, default=None, help="pipe to the launcher: written once loaded")
    parser.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_S)
    parser.add_argument("--heartbeat-liveness", type=int, default=HEARTBEAT_LIVENESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    die_with_parent()
    args = parse_args(argv)
    configure_logging()
    structlog.contextvars.bind_contextvars(rank=args.rank)
    try:
        code = serve(args)
        sys.stderr.flush()
    except KeyboardInterrupt:
        code = EXIT_STOPPED
    except Exception:
        log.exception("agent_crashed")
        code = EXIT_CRASHED
    os._exit(code)


if __name__ == "__main__":
    main()
