"""The broker: clients on one ROUTER, workers on another; route each request to a worker and its reply back.

One class, one poll loop (Majordomo style). State is three plain containers:
  - `workers`: identity -> WorkerRecord (what it serves, whether it is ready, when it was last heard from);
  - `requests`: a RequestTable of (client identity, request id) -> the worker holding it and its deadline;
  - nothing else. A request is answered exactly once: by the worker's reply, or by the broker with
    UNAVAILABLE (worker lost) or DEADLINE_EXCEEDED (deadline passed), whichever comes first.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq

from zmserve.codec import pack_header, peek_request_id, unpack_header
from zmserve.logs import get_logger
from zmserve.protocol import (
    DEFAULT_BROKER_CLIENT_ADDRESS,
    DEFAULT_BROKER_WORKER_ADDRESS,
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    MAX_REQUEST_BYTES,
    BrokerCommand,
    ErrorCode,
    MessageType,
    ServingError,
    normalize_address,
)
from zmserve.transport import HeartbeatClock, Liveness, drain, new_socket

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
    signatures: dict[str, Any] | None = None
    """Per method: input and output descriptors, when the worker's WORKER_STATUS carries `signatures`."""


@dataclass
class PendingRequest:
    worker: bytes
    deadline: float | None
    servable: str


class RequestTable:
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
        worker_address: str = DEFAULT_BROKER_WORKER_ADDRESS,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        heartbeat_liveness: int = HEARTBEAT_LIVENESS,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        context: zmq.Context | None = None,
    ) -> None:
        self.context = context or zmq.Context.instance()
        self.max_request_bytes = max_request_bytes
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_liveness = heartbeat_liveness
        self.clients = new_socket(self.context, zmq.ROUTER, ROUTER_MANDATORY=1)
        self.worker_socket = new_socket(self.context, zmq.ROUTER, ROUTER_MANDATORY=1)
        self.clients.bind(normalize_address(client_address))
        self.worker_socket.bind(normalize_address(worker_address))
        self.client_endpoint = self.clients.getsockopt_string(zmq.LAST_ENDPOINT)
        self.worker_endpoint = self.worker_socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workers: dict[bytes, WorkerRecord] = {}
        self.seen_servables: set[str] = set()
        """Servables some worker served: while none does, requests for them are UNAVAILABLE, not NOT_FOUND."""
        self.requests = RequestTable()
        self.heartbeat = HeartbeatClock(heartbeat_interval)
        self.stop_event = threading.Event()

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("broker_started", clients=self.client_endpoint, workers=self.worker_endpoint)
        poller = zmq.Poller()
        poller.register(self.clients, zmq.POLLIN)
        poller.register(self.worker_socket, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                ready = dict(poller.poll(timeout=min(self.heartbeat_interval, 0.1) * 1000))
                if self.worker_socket in ready:
                    drain(self.worker_socket, self.process_worker)
                if self.clients in ready:
                    drain(self.clients, self.process_client)
                self.do_chores()
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    # ---- client -> broker -> worker -------------------------------------------------------------------------
    def process_client(self, frames: list[zmq.Frame]) -> None:
        client = frames[0].bytes
        request_id = None
        try:
            if len(frames) < 2:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, "a request needs a header frame")
            size = sum(len(frame) for frame in frames[1:])
            if size > self.max_request_bytes:
                raise ServingError(ErrorCode.RESOURCE_EXHAUSTED,
                                   f"the request has {size} bytes; this broker takes at most {self.max_request_bytes}")
            header = unpack_header(frames[1])
            request_id = header.get("id")
            if header["type"] == MessageType.METADATA_QUERY:
                self.answer_metadata(client, request_id, header.get("servable"))
                return
            if header["type"] != MessageType.REQUEST:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, f"clients send requests, not {header['type']}")
            _check_hashable_id(request_id)
            servable, method, version = header.get("servable"), header.get("method"), header.get("version", 0)
            if not isinstance(servable, str) or not isinstance(method, str) or not isinstance(version, int):
                raise ServingError(
                    ErrorCode.INVALID_ARGUMENT, "a request needs servable (str), method (str), version (int)"
                )
            key = (client, request_id)
            if key in self.requests:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, f"request id {request_id!r} is already in flight")
            worker = self.choose_worker(servable, method, version)
            timeout_ms = header.get("timeout_ms")
            deadline = time.monotonic() + timeout_ms / 1000 if isinstance(timeout_ms, int | float) else None
            try:
                self.worker_socket.send_multipart(
                    [worker.identity, BrokerCommand.REQUEST, client, *frames[1:]], flags=zmq.NOBLOCK, copy=False
                )
            except zmq.Again:
                raise ServingError(ErrorCode.RESOURCE_EXHAUSTED,
                                   f"the worker serving {servable!r} is not taking requests fast enough") from None
            except zmq.ZMQError as error:
                if error.errno != zmq.EHOSTUNREACH:
                    raise
                self.remove_worker(worker, "worker connection closed")
                raise ServingError(ErrorCode.UNAVAILABLE, f"the worker serving {servable!r} is gone") from None
            self.requests.add(key, PendingRequest(worker.identity, deadline, servable))
            worker.inflight.add(key)
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

    def answer_metadata(self, client: bytes, request_id: Any, servable: Any) -> None:
        """What is served, one entry per (servable, version), for `servable` or (None) every servable; `lost`
        names servables some worker served that none serves now."""
        entries: dict[tuple[str, int], dict[str, Any]] = {}
        for worker in self.workers.values():
            if servable is not None and worker.servable != servable:
                continue
            entry = entries.setdefault((worker.servable, worker.version), {
                "servable": worker.servable, "version": worker.version, "methods": sorted(worker.methods),
                "ready": False, "reason": worker.reason, "signatures": worker.signatures})
            if worker.ready:
                entry["ready"], entry["reason"] = True, ""
        served = {name for name, _ in entries}
        lost = sorted(name for name in self.seen_servables
                      if name not in served and (servable is None or name == servable))
        header = pack_header(MessageType.METADATA, id=request_id,
                             servables=[entries[key] for key in sorted(entries)], lost=lost)
        self.send_to_client(client, [header])

    def describe(self) -> str:
        if not self.workers:
            return "no servable is registered"
        served = sorted({f"{w.servable} (version {w.version}, methods {sorted(w.methods)})"
                         for w in self.workers.values()})
        return "served: " + ", ".join(served)

    # ---- worker -> broker -> client -------------------------------------------------------------------------
    def process_worker(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        if len(frames) < 3:
            log.warning("worker_message_malformed", frames=len(frames))
            return
        command = frames[1].bytes
        record = self.workers.get(identity)
        if record is not None:
            record.liveness.heard()
        if command == BrokerCommand.REPLY and len(frames) >= 4:
            self.forward_reply(record, frames[2].bytes, frames[3:])
        elif command == BrokerCommand.CONTROL:
            self.process_worker_control(identity, record, frames[2])
        else:
            log.warning("worker_message_malformed", command=command.hex())

    def forward_reply(self, record: WorkerRecord | None, client: bytes, frames: list[zmq.Frame]) -> None:
        try:
            header = unpack_header(frames[0])
        except ServingError as error:
            log.warning("worker_reply_malformed", message=error.message)
            return
        key = (client, header.get("id"))
        pending = self.requests.pop(key) if _is_hashable(key[1]) else None
        if pending is None:
            log.info("late_reply_dropped", request_id=header.get("id"))
            return
        if record is not None:
            record.inflight.discard(key)
        if pending.deadline is not None and time.monotonic() > pending.deadline:
            self.reply_error(client, key[1], ErrorCode.DEADLINE_EXCEEDED, "the reply came after the deadline")
            return
        self.send_to_client(client, frames)

    def process_worker_control(self, identity: bytes, record: WorkerRecord | None, frame: zmq.Frame) -> None:
        try:
            header = unpack_header(frame)
        except ServingError as error:
            log.warning("worker_control_malformed", message=error.message)
            return
        kind = header["type"]
        if kind == MessageType.WORKER_STATUS:
            self.update_worker(identity, record, header)
        elif kind == MessageType.WORKER_DISCONNECT and record is not None:
            self.remove_worker(record, "worker disconnected")

    def update_worker(self, identity: bytes, record: WorkerRecord | None, status: dict[str, Any]) -> None:
        servable, version, methods = status.get("servable"), status.get("version"), status.get("methods")
        if not isinstance(servable, str) or not isinstance(version, int) or not isinstance(methods, list):
            log.warning("worker_status_malformed")
            return
        ready, reason = bool(status.get("ready")), str(status.get("reason", ""))
        if record is None:
            record = WorkerRecord(identity, servable, version, frozenset(methods), ready, reason,
                                  Liveness(self.heartbeat_interval, self.heartbeat_liveness))
            self.workers[identity] = record
            self.seen_servables.add(servable)
            log.info("worker_registered", servable=servable, version=version, methods=sorted(methods),
                     ready=ready)
        elif record.ready != ready:
            log.info("worker_readiness_changed", servable=servable, ready=ready, reason=reason)
        record.ready, record.reason, record.methods = ready, reason, frozenset(methods)
        signatures = status.get("signatures")
        record.signatures = signatures if isinstance(signatures, dict) else None

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
            heartbeat = pack_header(MessageType.HEARTBEAT)
            for identity in list(self.workers):
                self.send_to_worker(identity, [BrokerCommand.CONTROL, heartbeat])

    # ---- sending --------------------------------------------------------------------------------------------
    def reply_error(self, client: bytes, request_id: Any, code: ErrorCode, message: str) -> None:
        header = pack_header(MessageType.ERROR, id=request_id, code=str(code), message=message)
        self.send_to_client(client, [header])

    def send_to_client(self, client: bytes, frames: list[Any]) -> None:
        try:
            self.clients.send_multipart([client, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("client_not_reading", client=client.hex())
        except zmq.ZMQError as error:
            if error.errno != zmq.EHOSTUNREACH:
                raise
            log.info("client_gone", client=client.hex())

    def send_to_worker(self, identity: bytes, frames: list[Any]) -> None:
        try:
            self.worker_socket.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("worker_not_reading", worker=identity.hex())
        except zmq.ZMQError as error:
            if error.errno != zmq.EHOSTUNREACH:
                raise
            record = self.workers.get(identity)
            if record is not None:
                self.remove_worker(record, "worker connection closed")

    def shutdown(self) -> None:
        for record in list(self.workers.values()):
            self.remove_worker(record, "broker shutting down")
        self.clients.close(linger=500)
        self.worker_socket.close(linger=500)
        structlog.contextvars.clear_contextvars()
        log.info("broker_stopped")


def _is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _check_hashable_id(request_id: Any) -> None:
    if request_id is None or not _is_hashable(request_id) or request_id != request_id:  # NaN never matches its reply
        raise ServingError(ErrorCode.INVALID_ARGUMENT, "a request needs an id (string or integer)")
