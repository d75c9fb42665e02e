"""One agent process: one rank, one model shard, one member of its stage's MindSpore collective group.

Two threads, so compute never waits on a socket and heartbeats flow while a model call runs:
  - the main thread owns MindSpore: it joins the group, loads the MindIR shard, and runs model calls;
  - `AgentIO` owns every socket: the control DEALER to the worker, the SUB its inputs arrive on, and where
    its outputs go (PUSH to the worker from the last stage; XPUB to the next stage from other stage leaders).
They talk through a queue (IO -> main) and an inproc PAIR (main -> IO).

Lifecycle: REGISTER -> (worker) CONFIGURE -> join group, load, warm up -> READY -> model calls ... The process
exits with EXIT_RESTART when the worker says shut down or goes silent (its launcher starts a fresh one: a
MindSpore process cannot re-join a group), EXIT_REJECTED when the worker refuses its rank.
"""

from __future__ import annotations

import argparse
import contextlib
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

log = get_logger("agent")


class AgentIO(threading.Thread):
    """Every socket of the agent, in one thread. Delivers control and model calls to `inbox`."""

    def __init__(self, context: zmq.Context, worker_address: str, rank: int, publish_address: str,
                 heartbeat_interval: float, heartbeat_liveness: int) -> None:
        super().__init__(name=f"agent-io-{rank}", daemon=True)
        self.context = context
        self.worker_address = worker_address
        self.rank = rank
        self.publish_address = publish_address
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        pipe = f"inproc://agent-{rank}-{id(self)}"
        self.from_main = new_socket(context, zmq.PAIR)
        self.from_main.bind(pipe)
        self.to_io = new_socket(context, zmq.PAIR)
        self.to_io.connect(pipe)
        self.heartbeat = HeartbeatClock(heartbeat_interval)
        self.worker_liveness = Liveness(heartbeat_interval, heartbeat_liveness)
        self.worker_heard = False
        self.stopping = threading.Event()

    # called from the main thread --------------------------------------------------------------------------
    def send(self, kind: bytes, *frames: Any) -> None:
        self.to_io.send_multipart([kind, *frames], copy=False)

    # the IO thread -----------------------------------------------------------------------------------------
    def run(self) -> None:
        structlog.contextvars.bind_contextvars(rank=self.rank)
        try:
            self.serve_sockets()
        except Exception:
            log.exception("agent_io_crashed")
            os._exit(EXIT_CRASHED)

    def serve_sockets(self) -> None:
        self.control = new_socket(self.context, zmq.DEALER)
        self.control.connect(self.worker_address)
        self.inputs: zmq.Socket | None = None
        self.outputs: zmq.Socket | None = None
        self.downstream: zmq.Socket | None = None
        self.expected_downstream: set[int] = set()
        self.subscribed: set[int] = set()
        self.ready_header: bytes | None = None
        self.forward = "none"
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.from_main, zmq.POLLIN)
        try:
            while not self.stopping.is_set():
                self.poller.poll(timeout=100)
                drain(self.control, self.handle_control)
                drain(self.from_main, self.handle_main)
                if self.inputs is not None:
                    drain(self.inputs, lambda frames: self.inbox.put(("call", frames[1:])))
                if self.downstream is not None:
                    drain(self.downstream, self.handle_subscription)
                if self.ready_header is not None and self.expected_downstream <= self.subscribed:
                    self.control.send(self.ready_header)
                    self.ready_header = None
                self.do_chores()
        finally:
            for sock in (self.control, self.inputs, self.outputs, self.downstream, self.from_main):
                if sock is not None:
                    sock.close()

    def handle_control(self, frames: list[zmq.Frame]) -> None:
        header = self.read_control(frames)
        if header is None or header["type"] != MessageType.AGENT_CONFIGURE:
            return
        self.forward = header["forward"]
        self.inputs = new_socket(self.context, zmq.SUB, RCVHWM=0)
        self.inputs.connect(header["input_address"])
        self.inputs.setsockopt(zmq.SUBSCRIBE, MODEL_CALL_TOPIC)
        self.inputs.setsockopt(zmq.SUBSCRIBE, SUBSCRIBER_TOPIC_PREFIX + str(self.rank).encode())
        self.poller.register(self.inputs, zmq.POLLIN)
        self.outputs = new_socket(self.context, zmq.PUSH, SNDHWM=0)
        self.outputs.connect(header["result_address"])
        if self.forward == "publish":
            self.downstream = new_socket(self.context, zmq.XPUB, XPUB_VERBOSE=1, SNDHWM=0)
            self.downstream.bind(self.publish_address)
            self.poller.register(self.downstream, zmq.POLLIN)
            self.expected_downstream = set(header["downstream_ranks"])

    def handle_subscription(self, frames: list[zmq.Frame]) -> None:
        message = frames[0].bytes
        if message[:1] == b"\x01" and message[1:].startswith(SUBSCRIBER_TOPIC_PREFIX):
            self.subscribed.add(int(message[1 + len(SUBSCRIBER_TOPIC_PREFIX):]))

    def handle_main(self, frames: list[zmq.Frame]) -> None:
        """What the main thread asks: control messages, its READY, and model outputs to forward."""
        kind, rest = frames[0].bytes, frames[1:]
        if kind == b"control":
            self.control.send_multipart(rest, copy=False)
        elif kind == b"ready":
            self.ready_header = rest[0].bytes
        elif kind == b"result" and self.forward == "publish" and self.downstream is not None:
            self.downstream.send_multipart([MODEL_CALL_TOPIC, *rest], copy=False)
        elif kind in (b"result", b"error") and self.outputs is not None:
            self.outputs.send_multipart(rest, copy=False)
        elif kind == b"exit":
            self.exit(int(rest[0].bytes))

    def read_control(self, frames: list[bytes]) -> dict[str, Any] | None:
        self.worker_liveness.heard()
        self.worker_heard = True
        try:
            header = unpack_header(frames[-1])
        except ServingError as error:
            log.warning("control_message_malformed", message=error.message)
            return None
        kind = header["type"]
        if kind == MessageType.AGENT_CONFIGURE:
            self.inbox.put((kind, header))
        elif kind == MessageType.AGENT_REJECTED:
            retry = bool(header.get("retry"))
            log.error("agent_rejected", why=header.get("message"), retry=retry)
            self.exit(EXIT_CRASHED if retry else EXIT_REJECTED)
        elif kind == MessageType.AGENT_SHUTDOWN:
            log.info("agent_shutdown", reason=header.get("reason"))
            self.exit(EXIT_RESTART)
        return header

    def exit(self, code: int) -> None:
        """Leave from the IO thread: the main thread may be stuck in a collective whose peer is gone, and
        MindSpore's exit hooks can wait on that group, so the process ends here without them."""
        for sock in (self.control, self.inputs, self.outputs, self.downstream):
            if sock is not None:
                sock.close(linger=100)
        sys.stderr.flush()
        os._exit(code)

    def do_chores(self) -> None:
        if self.heartbeat.due():
            with contextlib.suppress(zmq.Again):
                self.control.send(pack_header(MessageType.HEARTBEAT, rank=self.rank), flags=zmq.NOBLOCK)
        if self.worker_heard and self.worker_liveness.expired():
            log.warning("worker_lost", reason=f"no heartbeat for {self.worker_liveness.timeout:.1f} s")
            self.exit(EXIT_RESTART)


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

        init()
        self.cell = self.ms.nn.GraphCell(self.ms.load(str(self.model_file)))
        if self.signature.get("inputs"):
            self.run([np.zeros([d if d >= 0 else 1 for d in spec["shape"]], dtype=spec["dtype"])
                      for spec in self.signature["inputs"]])

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
    io = AgentIO(context, normalize_address(args.worker), args.rank, args.publish_address,
                 args.heartbeat_interval, args.heartbeat_liveness)
    io.start()
    io.send(b"control", pack_header(MessageType.AGENT_REGISTER, rank=args.rank, host=args.host, pid=os.getpid(),
                                    model_file=str(model_file), publish_address=args.publish_address,
                                    replaces_pid=args.replaces_pid))
    log.info("agent_registering", worker=args.worker, model_file=str(model_file))
    runner = ShardRunner(model_file, signature)
    forward = "none"
    while True:
        kind, payload = io.inbox.get()
        if kind == MessageType.AGENT_CONFIGURE:
            forward = payload["forward"]
            structlog.contextvars.bind_contextvars(stage=payload["stage"])
            started = time.monotonic()
            try:
                runner.join_group_and_load(payload)
            except Exception as exc:
                log.exception("agent_load_failed")
                io.send(b"control", pack_header(MessageType.AGENT_FAILED, message=f"{type(exc).__name__}: {exc}"))
                io.send(b"exit", str(EXIT_RESTART).encode())
                continue
            seconds = round(time.monotonic() - started, 2)
            log.info("agent_loaded", seconds=seconds, forward=forward)
            io.send(b"ready", pack_header(MessageType.AGENT_READY, rank=args.rank, signature=signature,
                                          load_seconds=seconds))
        elif kind == "call":
            run_call(runner, io, payload, args.rank, forward)


def run_call(runner: ShardRunner, io: AgentIO, frames: list[zmq.Frame], rank: int, forward: str) -> None:
    call_id = None
    try:
        header = unpack_header(frames[0])
        call_id = header.get("call")
        inputs = list(decode_values(header.get("values"), frames[1:]).values())
        outputs = runner.run(inputs)
    except Exception as exc:
        code = exc.code if isinstance(exc, ServingError) else ErrorCode.INTERNAL
        log.warning("model_call_failed", call=call_id, error=str(exc))
        io.send(b"error", pack_header(MessageType.MODEL_ERROR, call=call_id, rank=rank, code=str(code),
                                      message=f"{type(exc).__name__}: {exc}"))
        return
    if forward == "none":
        return
    descriptors, out_frames = encode_values({f"input{i}": v for i, v in enumerate(outputs)})
    kind = MessageType.MODEL_CALL if forward == "publish" else MessageType.MODEL_RESULT
    io.send(b"result", pack_header(kind, call=call_id, rank=rank, request_id=header.get("request_id"),
                                   values=descriptors), *out_frames)


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
    except KeyboardInterrupt:
        code = EXIT_STOPPED
    except Exception:
        log.exception("agent_crashed")
        code = EXIT_CRASHED
    os._exit(code)


if __name__ == "__main__":
    main()
