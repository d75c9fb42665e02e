"""The broker: clients on one ROUTER, workers on another; route each request to a worker and its reply back.

One class, one poll loop (Majordomo style). State is three plain containers:
  - `workers`: identity -> WorkerRecord (what it serves, whether it is ready, when it was last heard from);
  - `requests`: `InFlight`, (client identity, request id) -> the worker holding it and its deadline;
  - nothing else. A request is answered exactly once: by the worker's reply, or by the broker with
    UNAVAILABLE (worker lost) or DEADLINE_EXCEEDED (deadline passed), whichever comes first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq

from zmserve.logs import get_logger
from zmserve.loop import Handler, run_services
from zmserve.protocol import (
    DEFAULT_BROKER_CLIENT_ADDRESS,
    DEFAULT_BROKER_WORKER_ADDRESS,
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    MAX_REQUEST_BYTES,
    BrokerCommand,
    Error,
    ErrorCode,
    Heartbeat,
    Metadata,
    MetadataQuery,
    MethodSignature,
    Reply,
    Request,
    RequestId,
    ServableInfo,
    ServingError,
    WorkerDisconnect,
    WorkerStatus,
    deadline_of,
    decode,
    encode,
    error_frame,
    normalize_address,
    peek_request_id,
)
from zmserve.security import PLAINTEXT, Domain, Security
from zmserve.transport import Delivery, HeartbeatClock, Liveness, bind, frame_bytes, new_socket, send_nonblocking

log = get_logger("broker")


@dataclass
class WorkerRecord:
    """A worker as the broker knows it, refreshed by every WORKER_STATUS it sends."""

    identity: bytes
    servable: str
    version: int
    methods: frozenset[str]
    ready: bool
    reason: str
    liveness: Liveness
    inflight: set[tuple[bytes, Any]] = field(default_factory=set)
    declared_methods: tuple[str, ...] = ()
    """The methods in the order the servable declares them (the first is the default for OIP clients)."""
    signatures: dict[str, MethodSignature] = field(default_factory=dict)
    """Per method: its inputs and outputs, once the worker knows the model's signature."""


@dataclass
class PendingRequest:
    worker: bytes
    deadline: float | None
    servable: str


class InFlight:
    """Requests handed to workers and not answered yet."""

    def __init__(self) -> None:
        self._pending: dict[tuple[bytes, Any], PendingRequest] = {}

    def __contains__(self, key: tuple[bytes, Any]) -> bool:
        return key in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: tuple[bytes, Any], pending: PendingRequest) -> None:
        self._pending[key] = pending

    def pop(self, key: tuple[bytes, Any]) -> PendingRequest | None:
        return self._pending.pop(key, None)

    def expired(self, now: float) -> list[tuple[bytes, Any]]:
        return [key for key, p in self._pending.items() if p.deadline is not None and p.deadline <= now]


class Broker:
    def __init__(
        self,
        client_address: str = DEFAULT_BROKER_CLIENT_ADDRESS,
        worker_address: str | None = DEFAULT_BROKER_WORKER_ADDRESS,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        heartbeat_liveness: int = HEARTBEAT_LIVENESS,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        context: zmq.Context | None = None,
        security: Security = PLAINTEXT,
    ) -> None:
        self.context = context or zmq.Context.instance()
        self.max_request_bytes = max_request_bytes
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_liveness = heartbeat_liveness
        self.clients = new_socket(self.context, zmq.ROUTER, curve=security.server(Domain.CLIENTS), ROUTER_MANDATORY=1)
        self.worker_socket: zmq.Socket | None = None
        """Workers in other processes register here; None when only an in-process worker serves."""
        self.worker_endpoint = "none"
        try:
            self.client_endpoint = bind(self.clients, normalize_address(client_address), "broker's client socket")
            if worker_address:
                self.worker_socket = new_socket(self.context, zmq.ROUTER, curve=security.server(Domain.WORKERS),
                                                ROUTER_MANDATORY=1)
                self.worker_endpoint = bind(self.worker_socket, normalize_address(worker_address),
                                            "broker's worker socket")
        except BaseException:
            self.close_sockets()
            raise
        self.workers: dict[bytes, WorkerRecord] = {}
        self.seen_servables: set[str] = set()
        """Servables some worker served: while none does, requests for them are UNAVAILABLE, not NOT_FOUND."""
        self.requests = InFlight()
        self.in_process_workers: dict[bytes, Callable[[list[Any]], None]] = {}
        self.heartbeat = HeartbeatClock(heartbeat_interval)
        self.stop_event = threading.Event()

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.announce()
        try:
            run_services([self], self.stop_event)
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def announce(self) -> None:
        log.info("broker_started", clients=self.client_endpoint, workers=self.worker_endpoint)

    def handlers(self) -> list[tuple[zmq.Socket, Handler]]:
        workers = [(self.worker_socket, self.process_worker)] if self.worker_socket is not None else []
        return [*workers, (self.clients, self.process_client)]

    def poll_timeout(self) -> float:
        return min(self.heartbeat_interval, 0.1)

    # ---- client -> broker -> worker -------------------------------------------------------------------------
    def process_client(self, frames: list[zmq.Frame]) -> None:
        client = frames[0].bytes
        request_id: RequestId | None = None
        try:
            if len(frames) < 2:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, "a request needs a header frame")
            size = sum(len(frame) for frame in frames[1:])
            if size > self.max_request_bytes:
                raise ServingError(ErrorCode.RESOURCE_EXHAUSTED,
                                   f"the request has {size} bytes; this broker takes at most {self.max_request_bytes}")
            request = decode(frames[1], Request, MetadataQuery)
            request_id = request.id
            if isinstance(request, MetadataQuery):
                self.answer_metadata(client, request)
                return
            key = (client, request_id)
            if key in self.requests:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, f"request id {request_id!r} is already in flight")
            worker = self.choose_worker(request.servable, request.method, request.version)
            self.requests.add(key, PendingRequest(worker.identity, deadline_of(request.timeout_ms),
                                                  request.servable))
            worker.inflight.add(key)
            delivery = self.deliver_to_worker(worker.identity, [BrokerCommand.REQUEST, client, *frames[1:]])
            if delivery is not Delivery.SENT:
                self.requests.pop(key)
                worker.inflight.discard(key)
            if delivery is Delivery.WOULD_BLOCK:
                raise ServingError(ErrorCode.RESOURCE_EXHAUSTED,
                                   f"the worker serving {request.servable!r} is not taking requests fast enough")
            if delivery is Delivery.UNREACHABLE:
                self.remove_worker(worker, "worker connection closed")
                raise ServingError(ErrorCode.UNAVAILABLE, f"the worker serving {request.servable!r} is gone")
        except ServingError as error:
            if request_id is None and len(frames) >= 2:
                request_id = peek_request_id(frames[1])
            log.info("request_rejected", request_id=request_id, code=error.code, message=error.message)
            self.reply_error(client, request_id, error.code, error.message)

    def choose_worker(self, servable: str, method: str, version: int) -> WorkerRecord:
        """The least-loaded ready worker serving (servable, method, version); version 0 = newest."""
        serving = [w for w in self.workers.values() if w.servable == servable]
        if not serving and servable in self.seen_servables:
            raise ServingError(ErrorCode.UNAVAILABLE,
                               f"servable {servable!r} has no worker right now (its worker was lost); retry")
        if not serving:
            raise ServingError(ErrorCode.NOT_FOUND, f"servable {servable!r} is not served; {self.describe()}")
        versions = sorted({w.version for w in serving})
        chosen_version = versions[-1] if version == 0 else version
        serving = [w for w in serving if w.version == chosen_version]
        if not serving:
            raise ServingError(
                ErrorCode.NOT_FOUND, f"servable {servable!r} has no version {version}; versions: {versions}"
            )
        if method not in serving[0].methods:
            raise ServingError(
                ErrorCode.NOT_FOUND,
                f"servable {servable!r} has no method {method!r}; methods: {sorted(serving[0].methods)}",
            )
        ready = [w for w in serving if w.ready]
        if not ready:
            reasons = "; ".join(sorted({w.reason for w in serving if w.reason}))
            raise ServingError(ErrorCode.UNAVAILABLE, f"servable {servable!r} is not ready: {reasons}")
        return min(ready, key=lambda w: len(w.inflight))

    def answer_metadata(self, client: bytes, query: MetadataQuery) -> None:
        """What is served, one entry per (servable, version), for the queried servable or every one."""
        entries: dict[tuple[str, int], ServableInfo] = {}
        for worker in self.workers.values():
            if query.servable is not None and worker.servable != query.servable:
                continue
            known = entries.get((worker.servable, worker.version))
            if known is None or (worker.ready and not known.ready):
                entries[(worker.servable, worker.version)] = ServableInfo(
                    worker.servable, worker.version, list(worker.declared_methods or sorted(worker.methods)),
                    worker.ready, "" if worker.ready else worker.reason, worker.signatures)
        served = {name for name, _ in entries}
        lost = sorted(name for name in self.seen_servables
                      if name not in served and query.servable in (None, name))
        metadata = Metadata(id=query.id, servables=[entries[key] for key in sorted(entries)], lost=lost)
        self.send_to_client(client, [encode(metadata)])

    def describe(self) -> str:
        if not self.workers:
            return "no servable is registered"
        served = sorted({f"{w.servable} (version {w.version}, methods {sorted(w.methods)})"
                         for w in self.workers.values()})
        return "served: " + ", ".join(served)

    # ---- worker -> broker -> client -------------------------------------------------------------------------
    def process_worker(self, frames: list[Any]) -> None:
        """[worker identity][command][...]: from the worker ROUTER, or straight from an in-process worker."""
        if len(frames) < 3:
            log.warning("worker_message_malformed", frames=len(frames))
            return
        identity, command = frame_bytes(frames[0]), frame_bytes(frames[1])
        record = self.workers.get(identity)
        if record is not None:
            record.liveness.heard()
        if command == BrokerCommand.REPLY and len(frames) >= 4:
            self.forward_reply(record, frame_bytes(frames[2]), frames[3:])
        elif command == BrokerCommand.CONTROL:
            self.process_worker_control(identity, record, frames[2])
        else:
            log.warning("worker_message_malformed", command=command.hex())

    def forward_reply(self, record: WorkerRecord | None, client: bytes, frames: list[Any]) -> None:
        try:
            reply = decode(frames[0], Reply, Error)
        except ServingError as error:
            log.warning("worker_reply_malformed", message=error.message)
            return
        key = (client, reply.id)
        pending = self.requests.pop(key) if reply.id is not None else None
        if pending is None:
            log.info("late_reply_dropped", request_id=reply.id)
            return
        if record is not None:
            record.inflight.discard(key)
        if pending.deadline is not None and time.monotonic() > pending.deadline:
            self.reply_error(client, reply.id, ErrorCode.DEADLINE_EXCEEDED, "the reply came after the deadline")
            return
        self.send_to_client(client, frames)

    def process_worker_control(self, identity: bytes, record: WorkerRecord | None, frame: Any) -> None:
        try:
            message = decode(frame, WorkerStatus, WorkerDisconnect, Heartbeat)
        except ServingError as error:
            log.warning("worker_control_malformed", message=error.message)
            return
        if isinstance(message, WorkerStatus):
            self.update_worker(identity, record, message)
        elif isinstance(message, WorkerDisconnect) and record is not None:
            self.remove_worker(record, "worker disconnected")

    def update_worker(self, identity: bytes, record: WorkerRecord | None, status: WorkerStatus) -> None:
        if record is None:
            record = WorkerRecord(identity, status.servable, status.version, frozenset(status.methods),
                                  status.ready, status.reason,
                                  Liveness(self.heartbeat_interval, self.heartbeat_liveness))
            self.workers[identity] = record
            self.seen_servables.add(status.servable)
            log.info("worker_registered", servable=status.servable, version=status.version,
                     methods=sorted(status.methods), ready=status.ready)
        elif record.ready != status.ready:
            log.info("worker_readiness_changed", servable=status.servable, ready=status.ready, reason=status.reason)
        record.ready, record.reason, record.methods = status.ready, status.reason, frozenset(status.methods)
        record.declared_methods, record.signatures = tuple(status.methods), status.signatures

    def remove_worker(self, record: WorkerRecord, why: str) -> None:
        """Forget a worker and answer everything it held: the client must never wait on a dead peer."""
        self.workers.pop(record.identity, None)
        log.warning("worker_removed", servable=record.servable, why=why, inflight=len(record.inflight))
        for client, request_id in record.inflight:
            if self.requests.pop((client, request_id)) is not None:
                self.reply_error(client, request_id, ErrorCode.UNAVAILABLE,
                                 f"the worker serving {record.servable!r} was lost ({why})")

    # ---- periodic chores ------------------------------------------------------------------------------------
    def do_chores(self) -> None:
        now = time.monotonic()
        for record in [w for w in self.workers.values() if w.liveness.expired(now)]:
            self.remove_worker(record, f"no heartbeat for {record.liveness.timeout:.1f} s")
        for client, request_id in self.requests.expired(now):
            pending = self.requests.pop((client, request_id))
            if pending is not None and (record := self.workers.get(pending.worker)) is not None:
                record.inflight.discard((client, request_id))
            self.reply_error(client, request_id, ErrorCode.DEADLINE_EXCEEDED,
                             "the request's deadline passed before a reply arrived")
        if self.heartbeat.due(now):
            heartbeat = encode(Heartbeat())
            for identity in list(self.workers):
                self.send_to_worker(identity, [BrokerCommand.CONTROL, heartbeat])

    # ---- sending --------------------------------------------------------------------------------------------
    def reply_error(self, client: bytes, request_id: RequestId | None, code: ErrorCode, message: str) -> None:
        self.send_to_client(client, [error_frame(request_id, code, message)])

    def send_to_client(self, client: bytes, frames: list[Any]) -> None:
        delivery = send_nonblocking(self.clients, [client, *frames])
        if delivery is Delivery.WOULD_BLOCK:
            log.warning("client_not_reading", client=client.hex())
        elif delivery is Delivery.UNREACHABLE:
            log.info("client_gone", client=client.hex())

    def deliver_to_worker(self, identity: bytes, frames: list[Any]) -> Delivery:
        """Frames for a worker: over the worker ROUTER, or handed straight to an in-process worker's loop."""
        in_process = self.in_process_workers.get(identity)
        if in_process is not None:
            in_process(frames)
            return Delivery.SENT
        if self.worker_socket is None:
            return Delivery.UNREACHABLE
        return send_nonblocking(self.worker_socket, [identity, *frames])

    def attach_in_process_worker(self, identity: bytes, deliver: Callable[[list[Any]], None]) -> None:
        """A worker running in this process and loop (`zmserve serve`): messages for it call `deliver`; it calls
        `process_worker` with its identity in front. Everything else treats it like any worker."""
        self.in_process_workers[identity] = deliver

    def send_to_worker(self, identity: bytes, frames: list[Any]) -> None:
        delivery = self.deliver_to_worker(identity, frames)
        if delivery is Delivery.WOULD_BLOCK:
            log.warning("worker_not_reading", worker=identity.hex())
        elif delivery is Delivery.UNREACHABLE and (record := self.workers.get(identity)) is not None:
            self.remove_worker(record, "worker connection closed")

    def shutdown(self) -> None:
        for record in list(self.workers.values()):
            self.remove_worker(record, "broker shutting down")
        self.close_sockets(linger=500)
        structlog.contextvars.clear_contextvars()
        log.info("broker_stopped")

    def close_sockets(self, linger: int = 0) -> None:
        for sock in (self.clients, self.worker_socket):
            if sock is not None:
                sock.close(linger=linger)
