"""The zmserve client: a DEALER socket to the broker, owned by one background thread.

`infer` is `infer_async(...).result()`: both share one core. Every request carries its timeout; the broker and
the worker enforce it, and the client enforces it too, so a dead broker still yields DEADLINE_EXCEEDED instead
of a hang.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from concurrent.futures import Future

import zmq

from zmserve.codec import Instance, decode_instances, encode_instances
from zmserve.protocol import Error, ErrorCode, Reply, Request, ServingError, decode, encode, normalize_address
from zmserve.transport import new_socket

DEFAULT_TIMEOUT_S = 60.0


class ClientError(Exception):
    """A request that failed: `.code` is an ErrorCode name, `.message` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Client:
    def __init__(self, address: str, servable: str, method: str, version: int = 0,
                 context: zmq.Context | None = None) -> None:
        self.address = normalize_address(address)
        self.servable, self.method, self.version = servable, method, version
        self._context = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[Future, float]] = {}
        pipe = f"inproc://zmserve-client-{uuid.uuid4().hex}"
        self._inbound = new_socket(self._context, zmq.PAIR)
        self._inbound.bind(pipe)
        self._outbound = new_socket(self._context, zmq.PAIR)
        self._outbound.connect(pipe)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zmserve-client", daemon=True)
        self._thread.start()

    def infer(self, instances: Instance | list[Instance], timeout: float = DEFAULT_TIMEOUT_S) -> list[Instance]:
        """Run the method on one instance (a dict) or a list of them; returns one dict per instance."""
        return self.infer_async(instances, timeout).result()

    def infer_async(self, instances: Instance | list[Instance], timeout: float = DEFAULT_TIMEOUT_S) -> Future:
        future: Future = Future()
        if self._closed.is_set():
            future.set_exception(ClientError(ErrorCode.UNAVAILABLE, "the client is closed"))
            return future
        batch = [instances] if isinstance(instances, dict) else list(instances)
        try:
            descriptors, frames = encode_instances(batch)
        except ServingError as error:
            future.set_exception(ClientError(error.code, error.message))
            return future
        request_id = next(self._ids)
        header = encode(Request(id=request_id, servable=self.servable, method=self.method, version=self.version,
                                timeout_ms=timeout * 1000, instances=descriptors))
        with self._lock:
            self._pending[request_id] = (future, time.monotonic() + timeout)
            self._outbound.send_multipart([header, *frames], copy=False)
        return future

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join()
        self._outbound.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the client's IO thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        broker = new_socket(self._context, zmq.DEALER)
        broker.connect(self.address)
        poller = zmq.Poller()
        poller.register(broker, zmq.POLLIN)
        poller.register(self._inbound, zmq.POLLIN)
        try:
            while not self._closed.is_set():
                events = dict(poller.poll(timeout=50))
                if self._inbound in events:
                    broker.send_multipart(self._inbound.recv_multipart(copy=False), copy=False)
                if broker in events:
                    self._resolve(broker.recv_multipart(copy=False))
                self._expire()
        finally:
            broker.close()
            self._inbound.close()
            with self._lock:
                pending, self._pending = self._pending, {}
            for future, _ in pending.values():
                if not future.done():
                    future.set_exception(ClientError(ErrorCode.UNAVAILABLE, "the client was closed"))

    def _resolve(self, frames: list[zmq.Frame]) -> None:
        try:
            reply = decode(frames[0], Reply, Error)
        except ServingError:
            return
        with self._lock:
            entry = self._pending.pop(reply.id, None)
        if entry is None:
            return
        future, deadline = entry
        if isinstance(reply, Error):
            future.set_exception(ClientError(reply.code, reply.message))
            return
        if time.monotonic() > deadline:
            future.set_exception(ClientError(ErrorCode.DEADLINE_EXCEEDED, "the reply came after the deadline"))
            return
        try:
            future.set_result(decode_instances(reply.instances, frames[1:]))
        except ServingError as error:
            future.set_exception(ClientError(error.code, error.message))

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [rid for rid, (_, deadline) in self._pending.items() if deadline + 0.05 <= now]
            expired = [self._pending.pop(rid)[0] for rid in late]
        for future in expired:
            future.set_exception(ClientError(ErrorCode.DEADLINE_EXCEEDED,
                                             "no reply before the deadline (is the broker running?)"))

