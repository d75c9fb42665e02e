"""The broker: clients on one ROUTER, workers on another; route each request to a worker and its reply back.

One class, one poll loop (Majordomo style). State is three plain containers:
  - `workers`: identity -> WorkerRecord (what it serves, whether it is ready, when it was last heard from);
  - `requests`: `InFlight`, (client identity, request id) -> the worker holding it, its deadline, and whether it
    may have reached a model yet;
  - nothing else. A request is answered exactly once: by the worker's reply, or by the broker with
    UNAVAILABLE (worker lost) or DEADLINE_EXCEEDED (deadline passed), whichever comes first. Which worker takes
    it is `routing.py`'s rule; a request whose worker is lost (or answers UNAVAILABLE) before the request reached
    a model is sent to another replica instead (`retry`, PROTOCOL.md §4.10).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
import zmq

from zmserve import trace as tracing
from zmserve.endpoints import DEFAULT_BROKER_CLIENT_ADDRESS, DEFAULT_BROKER_WORKER_ADDRESS, normalize_address
from zmserve.logs import Bursts, get_logger
from zmserve.loop import SCAN_INTERVAL_S, Handler, run_loop
from zmserve.metrics import OK, BrokerMetrics, RequestSeries
from zmserve.protocol import (
    MAX_REQUEST_BYTES,
    BrokerCommand,
    Cancel,
    DrainAck,
    Error,
    ErrorCode,
    Heartbeat,
    Metadata,
    MetadataQuery,
    MethodSignature,
    Partial,
    Reply,
    Request,
    RequestId,
    RequestsStarted,
    Retry,
    ServableInfo,
    ServingError,
    StatusQuery,
    WorkerDisconnect,
    WorkerStatus,
    deadline_of,
    decode,
    encode,
    error_frame,
    peek_request_id,
)
from zmserve.security import PLAINTEXT, Domain, Security
from zmserve.transport import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    Delivery,
    HeartbeatClock,
    Liveness,
    bind,
    frame_bytes,
    new_socket,
    read_pending,
    send_nonblocking,
)
from zmserve_services.broker.routing import LeastOutstanding, ready_of_version
from zmserve_services.broker.status import broker_gauges, compose_status

log = get_logger("broker")
bursts = Bursts(log)
"""Events that may come once per request or message: counted and summarised (logs.Bursts), never a line each."""


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
    status: WorkerStatus | None = None
    """The worker's last WORKER_STATUS: its agents and load, for `zmserve status`."""
    draining: bool = False
    """The worker finishes what it holds and stops: routed nothing more (its status says ready=false too)."""
    retry: Retry = Retry.BEFORE_MODEL
    """The servable's `retry_on_replica_loss`, for the requests that do not choose."""
    chat_template: str = ""
    """The servable folder's chat template, for METADATA (the gateway's OpenAI chat endpoint)."""


@dataclass
class PendingRequest:
    worker: bytes
    deadline: float | None
    servable: str
    series: RequestSeries | None = None
    """Its (servable, method, version) in the metrics; None for a request no metric follows."""
    arrived: float = 0.0
    request: Request | None = None
    """The decoded request and the frames it came in ([header, *values]), kept (no copy) to send it again; let go
    as soon as its policy says it will not be (so a large request is not held twice as long as before)."""
    frames: list[Any] = field(default_factory=list)
    retry: Retry = Retry.NEVER
    """When it may go to another replica if its worker loses it (the request's choice, else the servable's)."""
    started: bool = False
    """Its worker said it handed the request to the model (REQUESTS_STARTED): never sent anywhere else."""
    tried: tuple[bytes, ...] = ()
    """The workers it was sent to, in order."""
    streamed: bool = False
    """A PARTIAL of it reached the client: never sent to another replica (the client has part of this run's
    answer)."""


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

    def get(self, key: tuple[bytes, Any]) -> PendingRequest | None:
        return self._pending.get(key)

    def expired(self, now: float) -> list[tuple[bytes, Any]]:
        return [key for key, p in self._pending.items() if p.deadline is not None and p.deadline <= now]


@dataclass(frozen=True)
class InProcessWorker:
    """A worker in this process and loop (`zmserve serve`): the broker calls it instead of sending to it."""

    take_request: Callable[[bytes, Request, list[Any]], None]
    """(client, the decoded request, its value frames): a request, handed over without re-encoding it."""
    process_broker: Callable[[list[Any]], None]
    """Any other message, as the frames the worker's DEALER would have read ([command, ...])."""


class Broker:
    def __init__(
        self,
        client_address: str = DEFAULT_BROKER_CLIENT_ADDRESS,
        worker_address: str | None = DEFAULT_BROKER_WORKER_ADDRESS,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        heartbeat_liveness: int = HEARTBEAT_LIVENESS,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        context: zmq.Context | None = None,
        metrics: bool = False,
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
        self.in_process_workers: dict[bytes, InProcessWorker] = {}
        self.routes: dict[tuple[str, str, int], list[WorkerRecord]] = {}
        """choose_worker's answers (the ready workers of a servable, method and version), until a worker changes."""
        self.spread = LeastOutstanding()
        self.heartbeat = HeartbeatClock(heartbeat_interval)
        self.scan = HeartbeatClock(SCAN_INTERVAL_S)
        self.stop_event = threading.Event()
        self.started_at = time.monotonic()
        self.learning_window_s = heartbeat_interval * self.heartbeat_liveness
        """After a start, how long an unknown servable is UNAVAILABLE (its worker may not have reported yet), not
        NOT_FOUND."""
        self.metrics = BrokerMetrics(metrics, gauges=lambda: broker_gauges(self))
        """Prometheus (when `metrics`) and the last minutes of each servable's traffic (always)."""

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        run_loop([self], self.stop_event)

    def stop(self) -> None:
        self.stop_event.set()

    def drain(self) -> None:
        """The broker holds no work of its own (its workers drain theirs): it stops."""
        self.stop()

    def start(self) -> None:
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
        request: Request | MetadataQuery | StatusQuery | Cancel | None = None
        try:
            if len(frames) < 2:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, "a request needs a header frame")
            size = sum(len(frame) for frame in frames[1:])
            if size > self.max_request_bytes:
                raise ServingError(ErrorCode.RESOURCE_EXHAUSTED,
                                   f"the request has {size} bytes; this broker takes at most {self.max_request_bytes}")
            self.metrics.received(size)
            request = decode(frames[1], Request, MetadataQuery, StatusQuery, Cancel)
            request_id = request.id
            if isinstance(request, Cancel):
                self.cancel(client, request.id, frames[1])
                return
            if not isinstance(request, Request):
                self.answer_query(client, request)
                return
            tracing.stamp(request.trace, tracing.BROKER_IN)
            key = (client, request_id)
            if key in self.requests:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, f"request id {request_id!r} is already in flight")
            now = time.monotonic()
            pending = PendingRequest(b"", deadline_of(request.timeout_ms, now), request.servable, arrived=now,
                                     request=request, frames=frames[1:])
            self.dispatch(client, key, pending)
        except ServingError as error:
            if request_id is None and len(frames) >= 2:
                request_id = peek_request_id(frames[1])
            bursts.info("request_rejected", key=error.code, request_id=request_id, code=error.code,
                        message=error.message)
            servable, method = (request.servable, request.method) if isinstance(request, Request) else (None, None)
            self.metrics.rejected(servable, method, error.code, servable in self.seen_servables, time.monotonic())
            self.reply_error(client, request_id, error.code, error.message)

    def cancel(self, client: bytes, request_id: RequestId, header: Any) -> None:
        """The client gave up: answer CANCELLED now (one answer per request, as always) and tell the worker, which
        drops the request or discards its result. A cancel for a request already answered changes nothing."""
        key = (client, request_id)
        pending = self.requests.pop(key)
        if pending is None:
            log.debug("cancel_unmatched", request_id=request_id)
            return
        record = self.workers.get(pending.worker)
        if record is not None:
            record.inflight.discard(key)
            self.send_to_worker(record.identity, [BrokerCommand.CANCEL, client, header])
        self.finished(pending, ErrorCode.CANCELLED, time.monotonic())
        log.info("request_cancelled", request_id=request_id, servable=pending.servable)
        self.reply_error(client, request_id, ErrorCode.CANCELLED, "the client cancelled the request")

    def dispatch(self, client: bytes, key: tuple[bytes, Any], pending: PendingRequest) -> None:
        """Hand a request to a ready worker it has not been to, and record it as in flight there; raises the
        ServingError that answers it when none takes it. A worker whose connection is gone is removed and the next
        one tried: nothing reached it."""
        request = pending.request
        assert request is not None
        while True:
            worker = self.choose_worker(request.servable, request.method, request.version, pending.tried)
            pending.worker, pending.tried = worker.identity, (*pending.tried, worker.identity)
            pending.retry = worker.retry if request.retry is None else request.retry
            pending.series = self.metrics.series(request.servable, request.method, worker.version)
            self.requests.add(key, pending)
            worker.inflight.add(key)
            delivery = self.deliver_request(worker.identity, client, request, pending.frames)
            if delivery is Delivery.SENT:
                if pending.retry is Retry.NEVER:
                    pending.request, pending.frames = None, []  # never sent again: hold no tensor for it
                return
            self.requests.pop(key)
            worker.inflight.discard(key)
            if delivery is Delivery.WOULD_BLOCK:
                raise ServingError(ErrorCode.RESOURCE_EXHAUSTED,
                                   f"the worker serving {request.servable!r} is not taking requests fast enough")
            self.remove_worker(worker, "worker connection closed")

    def choose_worker(self, servable: str, method: str, version: int,
                      exclude: tuple[bytes, ...] = ()) -> WorkerRecord:
        """The ready worker of (servable, method, version) with the fewest requests outstanding, not one in
        `exclude`; version 0 = the newest version that has a ready worker (routing.py)."""
        ready = self.routes.get((servable, method, version))
        if ready is None:
            ready = self.routes[(servable, method, version)] = self.ready_workers(servable, method, version)
        chosen = self.spread.choose(ready, exclude)
        if chosen is None:
            raise ServingError(ErrorCode.UNAVAILABLE,
                               f"no other worker of servable {servable!r} is ready to take the request")
        return chosen

    def ready_workers(self, servable: str, method: str, version: int) -> list[WorkerRecord]:
        """Every ready worker that may take (servable, method, version), or the ServingError saying why none."""
        serving = [w for w in self.workers.values() if w.servable == servable]
        if not serving and servable in self.seen_servables:
            raise ServingError(ErrorCode.UNAVAILABLE,
                               f"servable {servable!r} has no worker right now (its worker was lost); retry")
        if not serving and (age := time.monotonic() - self.started_at) < self.learning_window_s:
            # a restarted broker learns its workers from their next WORKER_STATUS (every heartbeat interval): not
            # knowing a servable yet is no proof that it does not exist
            raise ServingError(ErrorCode.UNAVAILABLE,
                               f"servable {servable!r} is not known yet: this broker started {age:.1f} s ago and "
                               f"learns its workers within {self.learning_window_s:.0f} s; retry")
        if not serving:
            raise ServingError(ErrorCode.NOT_FOUND, f"servable {servable!r} is not served; {self.describe()}")
        return ready_of_version(serving, servable, method, version)

    def retry(self, client: bytes, request_id: RequestId, pending: PendingRequest, why: str) -> bool:
        """Send a request again, to a replica it has not been to, when its worker lost it (or answered UNAVAILABLE)
        before answering: only if its policy allows it at this point (`may_retry`) and its deadline has not
        passed. The header is sent again with the time left. False: the caller answers the request."""
        request = pending.request
        if not may_retry(pending) or request is None:
            return False
        now = time.monotonic()
        if pending.deadline is not None:
            if now >= pending.deadline:
                return False
            request = msgspec.structs.replace(request, timeout_ms=(pending.deadline - now) * 1000)
            pending.request, pending.frames = request, [encode(request), *pending.frames[1:]]
        try:
            self.dispatch(client, (client, request_id), pending)
        except ServingError:
            return False
        bursts.info("request_retried", request_id=request_id, servable=request.servable, why=why,
                    attempt=len(pending.tried))
        return True

    def answer_query(self, client: bytes, query: MetadataQuery | StatusQuery) -> None:
        """What is served (METADATA_QUERY), or that and every worker, agent and servable's traffic (STATUS_QUERY)."""
        if isinstance(query, StatusQuery):
            answer = compose_status(self, query.id, time.monotonic())
        else:
            answer = self.metadata(query.servable, query.id)
        self.send_to_client(client, [encode(answer)])

    def metadata(self, servable: str | None, query_id: RequestId = 0) -> Metadata:
        """What is served, one entry per (servable, version), for `servable` or every one (None)."""
        entries: dict[tuple[str, int], ServableInfo] = {}
        for worker in self.workers.values():
            if servable is not None and worker.servable != servable:
                continue
            known = entries.get((worker.servable, worker.version))
            if known is None or (worker.ready and not known.ready):
                entries[(worker.servable, worker.version)] = ServableInfo(
                    worker.servable, worker.version, list(worker.declared_methods or sorted(worker.methods)),
                    worker.ready, "" if worker.ready else worker.reason, worker.signatures, worker.chat_template)
        served = {name for name, _ in entries}
        lost = sorted(name for name in self.seen_servables if name not in served and servable in (None, name))
        return Metadata(id=query_id, servables=[entries[key] for key in sorted(entries)], lost=lost)

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
            bursts.warning("worker_message_malformed", frames=len(frames))
            return
        identity, command = frame_bytes(frames[0]), frame_bytes(frames[1])
        record = self.workers.get(identity)
        if record is not None:
            record.liveness.heard()
        if command == BrokerCommand.REPLY and len(frames) >= 4:
            self.forward_reply(identity, frame_bytes(frames[2]), frames[3:])
        elif command == BrokerCommand.CONTROL:
            self.process_worker_control(identity, record, frames[2])
        else:
            bursts.warning("worker_message_malformed", command=command.hex())

    def forward_reply(self, identity: bytes, client: bytes, frames: list[Any]) -> None:
        try:
            reply = decode(frames[0], Reply, Error, Partial)
        except ServingError as error:
            bursts.warning("worker_reply_malformed", message=error.message)
            return
        if isinstance(reply, Partial):
            self.take_partial(identity, client, reply.id, frames)
            return
        if isinstance(reply, Reply) and reply.trace is not None:
            tracing.stamp(reply.trace, tracing.BROKER_IN)
            frames = tracing.restamp(reply, frames, tracing.BROKER_OUT)
        self.take_reply(identity, client, reply.id, OK if isinstance(reply, Reply) else reply.code, frames)

    def take_reply(self, identity: bytes, client: bytes, request_id: RequestId | None, code: str,
                   frames: list[Any]) -> None:
        """Worker `identity`'s answer ([header, *values]) to the request `request_id` of `client`, `code` its
        code (OK for a result): to the client, unless the broker has answered that request already (deadline,
        lost worker), sent it to another worker since, or its deadline has passed."""
        key = (client, request_id)
        pending = self.requests.get(key) if request_id is not None else None
        if pending is None or pending.worker != identity:
            bursts.info("late_reply_dropped", request_id=request_id)
            return
        self.requests.pop(key)
        if (record := self.workers.get(identity)) is not None:
            record.inflight.discard(key)
        if (code == ErrorCode.UNAVAILABLE and may_retry(pending)
                and self.retry(client, request_id, pending, "its worker answered UNAVAILABLE")):
            return
        now = time.monotonic()
        if pending.deadline is not None and now > pending.deadline:
            self.finished(pending, ErrorCode.DEADLINE_EXCEEDED, now)
            self.reply_error(client, request_id, ErrorCode.DEADLINE_EXCEEDED, "the reply came after the deadline")
            return
        self.finished(pending, code, now)
        self.send_to_client(client, frames)

    def take_partial(self, identity: bytes, client: bytes, request_id: RequestId, frames: list[Any]) -> None:
        """A PARTIAL ([header, *values]) of a streamed request: to the client, and the request stays open for its
        one REPLY or ERROR. From now on it is never sent to another replica. Dropped like a late reply when the
        request is answered already or held by another worker; after its deadline the broker's DEADLINE_EXCEEDED is
        on its way."""
        key = (client, request_id)
        pending = self.requests.get(key)
        if pending is None or pending.worker != identity:
            bursts.info("late_partial_dropped", request_id=request_id)
            return
        if pending.deadline is not None and time.monotonic() > pending.deadline:
            return
        if not pending.streamed:
            pending.streamed = True
            pending.request, pending.frames = None, []  # never sent again: hold no tensor for it
        if self.send_to_client(client, frames) is Delivery.UNREACHABLE:  # the client is gone: stop generating
            self.cancel(client, request_id, encode(Cancel(id=request_id)))

    def take_in_process_reply(self, identity: bytes, client: bytes, request_id: RequestId | None, code: str,
                              frames: list[Any]) -> None:
        """`take_reply` for a worker in this process: its reply's request id and code come with it, not to be
        decoded."""
        self.take_reply(identity, client, request_id, code, frames)

    def take_in_process_started(self, identity: bytes, keys: list[tuple[bytes, Any]]) -> None:
        """REQUESTS_STARTED from a worker in this process, as the (client, request id) pairs."""
        self.requests_started(identity, keys)

    def finished(self, pending: PendingRequest, code: str, now: float) -> None:
        if pending.series is not None:
            self.metrics.finished(pending.series, code, pending.arrived, now)

    def process_worker_control(self, identity: bytes, record: WorkerRecord | None, frame: Any) -> None:
        try:
            message = decode(frame, WorkerStatus, WorkerDisconnect, Heartbeat, RequestsStarted)
        except ServingError as error:
            bursts.warning("worker_control_malformed", message=error.message)
            return
        if isinstance(message, RequestsStarted):
            self.requests_started(identity, zip(message.clients, message.ids, strict=False))
        elif isinstance(message, WorkerStatus):
            self.update_worker(identity, record, message)
        elif isinstance(message, WorkerDisconnect) and record is not None:
            self.remove_worker(record, "worker disconnected", clean=True)

    def requests_started(self, identity: bytes, keys: Any) -> None:
        """The worker handed these (client, request id)s to its model: they are never sent anywhere else."""
        for key in keys:
            pending = self.requests.get(key)
            if pending is not None and pending.worker == identity:
                pending.started = True
                if pending.retry is Retry.BEFORE_MODEL:  # never sent again now: hold no tensor for it
                    pending.request, pending.frames = None, []

    def update_worker(self, identity: bytes, record: WorkerRecord | None, status: WorkerStatus) -> None:
        self.routes.clear()
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
        if status.draining and not record.draining:
            log.info("worker_draining", servable=status.servable, version=status.version,
                     inflight=len(record.inflight))
        record.ready, record.reason, record.methods = status.ready, status.reason, frozenset(status.methods)
        record.declared_methods, record.signatures = tuple(status.methods), status.signatures
        record.status = status
        record.draining, record.retry, record.chat_template = status.draining, status.retry, status.chat_template
        record.ready = record.ready and not record.draining
        if record.draining:  # every status of a draining worker: the answer may be what it waits for
            self.send_to_worker(identity, [BrokerCommand.CONTROL, encode(DrainAck())])

    def remove_worker(self, record: WorkerRecord, why: str, clean: bool = False, retry: bool = True) -> None:
        """Forget a worker and answer everything it held: the client must never wait on a dead peer. A request
        that never reached its model goes to another replica instead, if it may (`retry`). A clean stop (the
        worker said goodbye, or this broker stops) is information, a lost worker a warning."""
        self.workers.pop(record.identity, None)
        self.routes.clear()
        (log.info if clean else log.warning)("worker_removed", servable=record.servable, version=record.version,
                                             why=why, inflight=len(record.inflight))
        held, record.inflight = record.inflight, set()
        for client, request_id in held:
            pending = self.requests.pop((client, request_id))
            if pending is None or (retry and self.retry(client, request_id, pending, f"its worker was lost ({why})")):
                continue
            self.finished(pending, ErrorCode.UNAVAILABLE, time.monotonic())
            self.reply_error(client, request_id, ErrorCode.UNAVAILABLE,
                             f"the worker serving {record.servable!r} was lost ({why})")

    # ---- periodic chores ------------------------------------------------------------------------------------
    def do_chores(self) -> None:
        now = time.monotonic()
        if not self.scan.due(now):
            return
        if self.worker_socket is not None and any(w.liveness.expired(now) for w in self.workers.values()):
            read_pending(self.worker_socket, self.process_worker)  # a loop stalled after its read must not judge by it
        for record in [w for w in self.workers.values() if w.liveness.expired(now)]:
            self.remove_worker(record, f"no heartbeat for {record.liveness.timeout:.1f} s")
        for client, request_id in self.requests.expired(now):
            pending = self.requests.pop((client, request_id))
            if pending is not None:
                self.finished(pending, ErrorCode.DEADLINE_EXCEEDED, now)
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

    def send_to_client(self, client: bytes, frames: list[Any]) -> Delivery:
        self.metrics.sent(frames)
        delivery = send_nonblocking(self.clients, [client, *frames])
        if delivery is Delivery.WOULD_BLOCK:
            bursts.warning("client_not_reading", client=client.hex())
        elif delivery is Delivery.UNREACHABLE:
            bursts.info("client_gone", client=client.hex())
        return delivery

    def deliver_to_worker(self, identity: bytes, frames: list[Any]) -> Delivery:
        """Frames for a worker: over the worker ROUTER, or handed straight to an in-process worker's loop."""
        in_process = self.in_process_workers.get(identity)
        if in_process is not None:
            in_process.process_broker(frames)
            return Delivery.SENT
        if self.worker_socket is None:
            return Delivery.UNREACHABLE
        return send_nonblocking(self.worker_socket, [identity, *frames])

    def deliver_request(self, identity: bytes, client: bytes, request: Request, frames: list[Any]) -> Delivery:
        """A client's request ([header, *values]) for a worker; an in-process worker takes it decoded."""
        in_process = self.in_process_workers.get(identity)
        if in_process is not None:
            tracing.stamp(request.trace, tracing.BROKER_OUT)
            in_process.take_request(client, request, frames[1:])
            return Delivery.SENT
        if request.trace is not None:
            frames = tracing.restamp(request, frames, tracing.BROKER_OUT)
        return self.deliver_to_worker(identity, [BrokerCommand.REQUEST, client, *frames])

    def attach_in_process_worker(self, identity: bytes, worker: InProcessWorker) -> None:
        """A worker running in this process and loop (`zmserve serve`): messages for it are calls; it calls
        `process_worker` with its identity in front, and `take_in_process_reply` with its replies. Everything
        else treats it like any worker."""
        self.in_process_workers[identity] = worker

    def send_to_worker(self, identity: bytes, frames: list[Any]) -> None:
        delivery = self.deliver_to_worker(identity, frames)
        if delivery is Delivery.WOULD_BLOCK:
            bursts.warning("worker_not_reading", worker=identity.hex())
        elif delivery is Delivery.UNREACHABLE and (record := self.workers.get(identity)) is not None:
            self.remove_worker(record, "worker connection closed")

    def shutdown(self) -> None:
        for record in list(self.workers.values()):
            self.remove_worker(record, "broker shutting down", clean=True, retry=False)
        self.close_sockets(linger=500)
        structlog.contextvars.clear_contextvars()
        log.info("broker_stopped")

    def close_sockets(self, linger: int = 0) -> None:
        for sock in (self.clients, self.worker_socket):
            if sock is not None:
                sock.close(linger=linger)


def may_retry(pending: PendingRequest) -> bool:
    """PROTOCOL.md §4.10: `before_model` while no call of the request was published (REQUESTS_STARTED), `until_result`
    as long as the worker has not answered (the worker answers in the step that takes the model's result).
    A request whose PARTIAL reached its client is never sent again: the client holds part of that run's answer.
    """
    if pending.streamed:
        return False
    return pending.retry is Retry.UNTIL_RESULT or (pending.retry is Retry.BEFORE_MODEL and not pending.started)
