"""The zmserve client.

`infer` talks on a DEALER of the calling thread's own, from the calling thread: a request crosses no thread
hand-off on its way out or back. `infer_async` hands requests to one background IO thread, which owns its own
DEALER and resolves futures. Both send the same REQUEST and read the same answers (`Request` out; `Reply` or
`Error` in, matched by id).

Every request carries its timeout; the broker and the worker enforce it, and the client ends the call at the
deadline itself, so a dead broker still yields DEADLINE_EXCEEDED instead of a hang. Anything that goes wrong
inside the client (a bad address, a failed IO thread, a closed client) is a `ClientError` or a `ValueError`
at once, never a call that waits forever.

`infer_stream` (and `infer_stream_async`, `generate`) ask for a streamed answer (`Request.stream`): the IO thread
hands each PARTIAL to the stream in order, and the request's one REPLY or ERROR ends it (PROTOCOL.md §4.11).
Leaving the loop over a stream early, or closing it, cancels the request.

With `server_public_key` and `secret_key` the link to the broker runs CURVE (docs/SECURITY.md). Each DEALER's
monitor is polled next to it, so a broker that refuses the handshake (an unknown key, a wrong server key, keys
on one side only) ends the call at once with UNAUTHENTICATED instead of at the deadline; the refused socket is
dropped, so the next call tries a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from zmserve import trace as tracing
from zmserve.codec import Instance, decode_instances, encode_instances
from zmserve.protocol import Cancel, Error, ErrorCode, Partial, Reply, Request, Retry, ServingError, decode, encode
from zmserve.sampling import SamplingParams
from zmserve.security import CurveClient, Handshake, KeyPair, Refusal, client_curve, send_unless_refused
from zmserve.transport import new_socket, recv_frames, send_frames

DEFAULT_TIMEOUT_S = 60.0
NOT_SERVING_YET = (ErrorCode.UNAVAILABLE, ErrorCode.NOT_FOUND)
"""What a servable that is still starting answers: no worker registered it yet, or not all its agents are in."""
RETRY_WHILE_STARTING_S = 0.5
CANCEL_LINGER_MS = 500
"""How long a closing client's socket keeps trying to deliver what it sent last (requests, and the cancels of the
unanswered ones): a socket closed with no linger drops what its IO thread has not written yet."""
_ADDRESS = re.compile(r"^(?:tcp://)?(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})$")


class ClientError(Exception):
    """A request that failed: `.code` is an ErrorCode, `.message` says why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode(code)
        self.message = message


def broker_endpoint(address: str) -> str:
    """The ZeroMQ endpoint of a broker address given as `host:port`, `tcp://host:port` or `ipc://path`; anything
    else is a ValueError that names the accepted forms."""
    if address.startswith("ipc://") and len(address) > len("ipc://"):
        return address
    match = _ADDRESS.match(address.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"broker address {address!r} is not one of host:port, tcp://host:port or ipc://path "
                         "(for example 127.0.0.1:5500)")
    return f"tcp://{match['host']}:{match['port']}"


class Client:
    """Calls one method of one servable through a broker. Thread-safe: each thread that calls `infer` gets its
    own socket; `close()` (or leaving a `with` block) ends them all, and must not race a running `infer`.

    `retry`: when the broker may send a request to another replica if the worker holding it is lost: "never",
    "before_model" (only if that replica's model never saw it) or "until_result" (also if its model may have run it
    but the result was lost with the worker); None (the default) takes the servable's choice
    (`declare_servable(retry_on_replica_loss=...)`, by default "before_model"). PROTOCOL.md §4.10.


    CURVE: `server_public_key` is the broker's public key (its .key file's path, or the 40-character key as
    bytes) and `secret_key` this client's key pair (its .key_secret file's path, or a `KeyPair`); both or
    neither."""

    io_thread_class: type[IOThread]

    def __init__(self, address: str, servable: str, method: str, version: int = 0,
                 context: zmq.Context | None = None, retry: str | None = None, *,
                 server_public_key: str | os.PathLike | bytes | None = None,
                 secret_key: str | os.PathLike | KeyPair | None = None) -> None:
        self.address = broker_endpoint(address)
        self.servable, self.method, self.version = servable, method, version
        self.retry = Retry(retry) if retry is not None else None
        self._curve = client_curve(server_public_key, secret_key)
        self._context = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._per_thread = threading.local()
        self._io: IOThread | None = None
        self._closed = False

    # ---- the synchronous path: the calling thread's own socket ----------------------------------------------
    def infer(self, instances: Instance | list[Instance], timeout: float = DEFAULT_TIMEOUT_S,
              trace: list | None = None) -> list[Instance]:
        """Run the method on one instance (a dict) or a list of them; returns one dict per instance. With a
        `trace` list, the request is traced and the list receives its (hop, ns) stamps (zmserve/trace.py)."""
        request_id, frames, deadline = self._request(instances, timeout, trace is not None)
        link = self._thread_link()
        try:
            refusal = send_unless_refused(link.socket, frames, link.handshake, deadline)
        except TimeoutError:
            raise ClientError(ErrorCode.DEADLINE_EXCEEDED, self._no_reply(timeout)) from None
        if refusal is not None:
            self._drop(link)
            raise ClientError(ErrorCode.UNAUTHENTICATED, refused(self.address, refusal))
        try:
            while True:
                if not self._wait(link, deadline):
                    raise ClientError(ErrorCode.DEADLINE_EXCEEDED, self._no_reply(timeout))
                outcome = read_answer(recv_frames(link.socket), request_id)
                if outcome is not None:  # anything else answers an earlier request that this thread gave up on
                    tracing.finish(trace, outcome.trace)
                    break
        except ClientError:
            raise
        except BaseException:  # e.g. KeyboardInterrupt: nobody waits for this answer any more
            with contextlib.suppress(zmq.ZMQError):
                link.socket.send(encode(Cancel(id=request_id)), flags=zmq.NOBLOCK)
            raise
        return outcome.result()

    def _wait(self, link: _Link, deadline: float) -> bool:
        """Until the socket holds an answer (True) or the deadline passes (False). A refused handshake raises
        UNAUTHENTICATED and drops this thread's link."""
        while (remaining := deadline - time.monotonic()) > 0:
            ready = dict(link.poller.poll(math.ceil(remaining * 1000)))
            if link.socket in ready:
                return True
            if link.handshake.monitor in ready and (refusal := link.handshake.read()) is not None:
                self._drop(link)
                raise ClientError(ErrorCode.UNAUTHENTICATED, refused(self.address, refusal))
        return False

    def _thread_link(self) -> _Link:
        link = getattr(self._per_thread, "link", None)
        if link is None:
            link = _Link.open(self._context, self.address, self._curve)
            with self._lock:
                if self._closed:
                    link.close()
                    raise ClientError(ErrorCode.UNAVAILABLE, "the client is closed")
                self._links.append(link)
            self._per_thread.link = link
        return link

    def _drop(self, link: _Link) -> None:
        self._per_thread.link = None
        with self._lock:
            if link in self._links:
                self._links.remove(link)
        link.close()

    # ---- the asynchronous path: one IO thread ---------------------------------------------------------------
    def infer_async(self, instances: Instance | list[Instance], timeout: float = DEFAULT_TIMEOUT_S,
                    trace: list | None = None) -> Future:
        """Like `infer`, but returns a concurrent.futures.Future at once. `future.cancel()` before it resolves
        tells the broker and the worker (CANCEL): a request not yet handed to the agents is never computed."""
        return self._submit(instances, timeout, trace=trace)

    def _submit(self, instances: Instance | list[Instance], timeout: float,
                on_partial: Callable[[Partial, list[zmq.Frame]], None] | None = None,
                trace: list | None = None) -> Future:
        """Hand a request to the IO thread: its future, which a cancel turns into a CANCEL. `on_partial` (called on
        the IO thread) takes the request's PARTIALs, and makes it a streamed request."""
        future: Future = Future()
        try:
            request_id, frames, deadline = self._request(instances, timeout, trace is not None,
                                                         stream=on_partial is not None)
            with self._lock:
                if self._io is None or self._io.refused:  # a refused connection is not retried: start afresh
                    self._io = self.io_thread_class(self._context, self.address, self._curve)
                io = self._io
            io.submit(request_id, _Pending(future, deadline, self._no_reply(timeout), on_partial, trace), frames)
        except (ClientError, ValueError) as error:
            future.set_exception(error)
            return future
        future.add_done_callback(lambda done: io.cancel(request_id) if done.cancelled() else None)
        return future

    # ---- streamed answers -----------------------------------------------------------------------------------
    def infer_stream(self, instance: Instance, timeout: float = DEFAULT_TIMEOUT_S) -> InferStream:
        """Run the method on one instance and stream its answer: iterate the returned `InferStream` for the
        partial answers (one dict each, what the method yielded in that step), then `.result()` for the final
        outputs. Leaving the loop early, `close()` or leaving a `with` block cancels the request. Same deadline
        and error codes as `infer` (a ClientError raised where the answer is read)."""
        stream = InferStream()
        stream.attach(self._submit(_one_instance(instance), timeout, stream.take_partial))
        return stream

    def infer_stream_async(self, instance: Instance, timeout: float = DEFAULT_TIMEOUT_S) -> AsyncInferStream:
        """`infer_stream` for asyncio: an async iterator of the partial answers (`async for`), then
        `await .result()`; call it from a running event loop."""
        stream = AsyncInferStream(asyncio.get_running_loop())
        stream.attach(self._submit(_one_instance(instance), timeout, stream.take_partial))
        return stream

    def generate(self, prompt: str, *, timeout: float = DEFAULT_TIMEOUT_S, **sampling: Any) -> GenerationStream:
        """Generate text from `prompt` with this client's method (a generation method, contract: `prompt` and the
        sampling inputs of `zmserve.sampling.SamplingParams`: max_tokens, temperature, top_k, top_p,
        frequency_penalty, presence_penalty, seed). Iterate the stream for `GenerationChunk`s as they come;
        `.result()` is the whole `Generation`. A sampling value out of range is a ValueError at once."""
        return GenerationStream(self.infer_stream(generation_inputs(prompt, **sampling), timeout))

    def generate_async(self, prompt: str, *, timeout: float = DEFAULT_TIMEOUT_S,
                       **sampling: Any) -> AsyncGenerationStream:
        """`generate` for asyncio: `async for chunk in stream`, then `await stream.result()`."""
        return AsyncGenerationStream(self.infer_stream_async(generation_inputs(prompt, **sampling), timeout))

    # ---- shared -----------------------------------------------------------------------------------------------
    def _request(self, instances: Instance | list[Instance], timeout: float,
                 traced: bool = False, stream: bool = False) -> tuple[int, list[Any], float]:
        if self._closed:
            raise ClientError(ErrorCode.UNAVAILABLE, "the client is closed")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        batch = [instances] if isinstance(instances, dict) else list(instances)
        try:
            specs, value_frames = encode_instances(batch)
        except ServingError as error:
            raise ClientError(error.code, error.message) from None
        request_id = next(self._ids)
        header = encode(Request(id=request_id, servable=self.servable, method=self.method, version=self.version,
                                timeout_ms=timeout * 1000, instances=specs, retry=self.retry, stream=stream,
                                trace=tracing.start(traced)))
        return request_id, [header, *value_frames], time.monotonic() + timeout

    def _no_reply(self, timeout: float) -> str:
        return f"no reply before the deadline ({timeout:g} s) from {self.address} (is a broker listening there?)"

    def close(self) -> None:
        """End every socket; requests still unanswered on the async path are cancelled (CANCEL to the broker)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links, self._links, io = self._links, [], self._io
        if io is not None:
            io.close()
        for link in links:
            link.close(linger=CANCEL_LINGER_MS)  # a cancel sent on Ctrl-C just before still leaves

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(eq=False)
class _Link:
    """One DEALER to the broker, its handshake monitor, and a poller over both (made once, reused per call)."""

    socket: zmq.Socket
    handshake: Handshake
    poller: zmq.Poller

    @classmethod
    def open(cls, context: zmq.Context, address: str, curve: CurveClient | None) -> _Link:
        socket = new_socket(context, zmq.DEALER, curve=curve)
        handshake = Handshake(socket, curve is not None)
        socket.connect(address)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(handshake.monitor, zmq.POLLIN)
        return cls(socket, handshake, poller)

    def close(self, linger: int = 0) -> None:
        self.handshake.close(self.socket)
        self.socket.close(linger=linger)


REFUSAL_HINTS = {
    Refusal.UNKNOWN_KEY: "add this client's public key (.key) to the broker's --client-keys folder",
    Refusal.NEEDS_CURVE: "pass server_public_key= (the broker's .key) and secret_key= (this client's .key_secret)",
    Refusal.NO_CURVE: "the broker runs without CURVE: create the Client without keys, or turn CURVE on there",
    Refusal.WRONG_SERVER_KEY: "server_public_key must be the broker's public key (the .key of its --secret-key)",
    Refusal.PROTOCOL: "check that both sides run zmserve's CURVE settings (docs/SECURITY.md)",
}


def refused(address: str, refusal: Refusal) -> str:
    return f"the broker at {address} refused the connection: {refusal.value} ({REFUSAL_HINTS[refusal]})"


class _Outcome:
    """A decoded answer: a result, or the ClientError to raise."""

    def __init__(self, result: list[Instance] | None = None, error: ClientError | None = None,
                 trace: list | None = None) -> None:
        self._result, self.error, self.trace = result, error, trace

    def result(self) -> list[Instance]:
        if self.error is not None:
            raise self.error
        assert self._result is not None
        return self._result


def read_answer(frames: list[zmq.Frame], request_id: int | None = None) -> _Outcome | None:
    """The outcome of an answer frame set; None when it does not answer `request_id` (given), is a PARTIAL, or is
    unreadable."""
    answer = _decode_answer(frames)
    if answer is None or isinstance(answer, Partial) or (request_id is not None and answer.id != request_id):
        return None
    return _outcome(answer, frames)


def _decode_answer(frames: list[zmq.Frame]) -> Reply | Error | Partial | None:
    try:
        return decode(frames[0], Reply, Error, Partial)
    except ServingError:
        return None


def _outcome(answer: Reply | Error, frames: list[zmq.Frame]) -> _Outcome:
    if isinstance(answer, Error):
        return _Outcome(error=ClientError(answer.code, answer.message))
    try:
        return _Outcome(result=decode_instances(answer.instances, frames[1:]), trace=answer.trace)
    except ServingError as error:
        return _Outcome(error=ClientError(error.code, error.message))


@dataclass
class _Pending:
    future: Future
    deadline: float
    no_reply: str
    """What DEADLINE_EXCEEDED says when no answer came."""
    on_partial: Callable[[Partial, list[zmq.Frame]], None] | None = field(default=None)
    """A streamed request's PARTIALs go here (on the IO thread)."""
    trace: list | None = None
    """The caller's list for a traced request's stamps."""


class IOThread(threading.Thread):
    """Owns the async path's DEALER: sends what `submit` queues, resolves futures by id, expires deadlines. If
    it fails, every pending and later future fails with UNAVAILABLE naming the cause."""

    def __init__(self, context: zmq.Context, address: str, curve: CurveClient | None = None) -> None:
        super().__init__(name="zmserve-client", daemon=True)
        self.context, self.address, self.curve = context, address, curve
        self.lock = threading.Lock()
        self.pending: dict[int, _Pending] = {}
        self.failure: ClientError | None = None
        self.refused = False
        """The broker refused the handshake: this thread fails every request; the client starts a new one."""
        pipe = f"inproc://zmserve-client-{uuid.uuid4().hex}"
        self.inbound = new_socket(context, zmq.PAIR)
        self.inbound.bind(pipe)
        self.outbound = new_socket(context, zmq.PAIR)
        self.outbound.connect(pipe)
        self.closing = threading.Event()
        self.start()

    def submit(self, request_id: int, pending: _Pending, frames: list[Any]) -> None:
        with self.lock:
            if self.failure is not None:
                raise ClientError(self.failure.code, self.failure.message)
            if self.closing.is_set():
                raise ClientError(ErrorCode.UNAVAILABLE, "the client is closed")
            self.pending[request_id] = pending
            send_frames(self.outbound, frames)

    def cancel(self, request_id: int) -> None:
        """Any thread (a future's cancel): stop waiting for `request_id` and tell the broker, unless it is answered
        already."""
        with self.lock:
            if self.pending.pop(request_id, None) is None or self.failure is not None or self.closing.is_set():
                return
            self.outbound.send(encode(Cancel(id=request_id)))

    def close(self) -> None:
        self.closing.set()
        self.join()
        with self.lock:
            self.outbound.close()

    def run(self) -> None:
        try:
            link = _Link.open(self.context, self.address, self.curve)
            try:
                self.serve(link)
                self.cancel_pending(link.socket)
            finally:
                link.close(linger=CANCEL_LINGER_MS)
        except _Refused as refusal:
            self.refused = True
            self.fail_all(ClientError(ErrorCode.UNAUTHENTICATED, refused(self.address, refusal.refusal)))
        except Exception as exc:  # the promise is one answer per request, so a crash must answer them all
            self.fail_all(ClientError(ErrorCode.UNAVAILABLE,
                                      f"the client's IO thread failed: {type(exc).__name__}: {exc}"))
        else:
            self.fail_all(ClientError(ErrorCode.UNAVAILABLE, "the client was closed"))
        finally:
            self.inbound.close()

    def serve(self, link: _Link) -> None:
        broker, poller = link.socket, link.poller
        poller.register(self.inbound, zmq.POLLIN)
        while not self.closing.is_set():
            events = dict(poller.poll(timeout=self.poll_timeout_ms()))
            if link.handshake.monitor in events and (refusal := link.handshake.read()) is not None:
                raise _Refused(refusal)
            if self.inbound in events:
                while self.inbound.poll(0):
                    frames = recv_frames(self.inbound)
                    if (refusal := send_unless_refused(broker, frames, link.handshake)) is not None:
                        raise _Refused(refusal)
            if broker in events:
                while broker.poll(0):
                    self.resolve(recv_frames(broker))
            self.expire()

    def cancel_pending(self, broker: zmq.Socket) -> None:
        """The client is closing: send what is still queued to go out, and cancel what is still unanswered. The
        socket then closes with CANCEL_LINGER_MS, so that these, and what `serve` sent just before (still in the
        socket's queue), leave."""
        while self.inbound.poll(0):
            with contextlib.suppress(zmq.Again):
                broker.send_multipart(self.inbound.recv_multipart(copy=False), flags=zmq.NOBLOCK, copy=False)
        with self.lock:
            unanswered = [rid for rid, pending in self.pending.items() if not pending.future.done()]
        for request_id in unanswered:
            with contextlib.suppress(zmq.Again):
                broker.send(encode(Cancel(id=request_id)), flags=zmq.NOBLOCK)

    def poll_timeout_ms(self) -> int:
        with self.lock:
            earliest = min((p.deadline for p in self.pending.values()), default=None)
        if earliest is None:
            return 50
        return max(0, min(50, int((earliest - time.monotonic()) * 1000) + 1))

    def resolve(self, frames: list[zmq.Frame]) -> None:
        answer = _decode_answer(frames)
        if answer is None or not isinstance(answer.id, int):
            return
        if isinstance(answer, Partial):
            with self.lock:
                pending = self.pending.get(answer.id)
            if pending is not None and pending.on_partial is not None and not pending.future.done():
                pending.on_partial(answer, frames[1:])
            return
        with self.lock:
            pending = self.pending.pop(answer.id, None)
        if pending is None or pending.future.done():  # a cancelled future stays cancelled
            return
        outcome = _outcome(answer, frames)
        if outcome.error is not None:
            pending.future.set_exception(outcome.error)
        else:
            tracing.finish(pending.trace, outcome.trace)
            pending.future.set_result(outcome.result())

    def expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            late = [rid for rid, pending in self.pending.items() if pending.deadline <= now]
            expired = [self.pending.pop(rid) for rid in late]
        for pending in expired:
            if not pending.future.done():
                pending.future.set_exception(ClientError(ErrorCode.DEADLINE_EXCEEDED, pending.no_reply))

    def fail_all(self, failure: ClientError) -> None:
        with self.lock:
            self.failure = self.failure or failure
            pending, self.pending = self.pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(ClientError(failure.code, failure.message))


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.value)
        self.refusal = refusal


Client.io_thread_class = IOThread


def _one_instance(instance: Instance) -> list[Instance]:
    if not isinstance(instance, dict):
        raise TypeError(f"a streamed request takes one instance (a dict), got {type(instance).__name__}")
    return [instance]


_END = object()
"""Put into a stream's queue when its request is answered (after every PARTIAL it had)."""


class _Stream:
    """What the sync and async streams share: the request's future, the PARTIALs the IO thread hands over (in
    order), and the check that they come numbered 0, 1, 2, ... (a gap is an error, never a silent loss)."""

    def __init__(self) -> None:
        self._future: Future | None = None
        self._expected = 0
        self._ended = False
        self.arrivals: list[float] = []
        """perf_counter() when each PARTIAL reached the client (its IO thread): what a benchmark's time to first
        token and inter-token latency are made of."""

    def attach(self, future: Future) -> None:
        self._future = future
        future.add_done_callback(lambda _: self._put(_END))

    @property
    def future(self) -> Future:
        """The request's future: done once it is answered (its result the final outputs, one dict per instance);
        a callback on it runs on the IO thread after every partial was taken."""
        assert self._future is not None
        return self._future

    def _put(self, item: Any) -> None:
        raise NotImplementedError

    def take_partial(self, partial: Partial, frames: list[zmq.Frame]) -> None:
        """On the IO thread: queue one PARTIAL's values (or the error of reading them)."""
        self.arrivals.append(time.perf_counter())
        try:
            values: Instance | ClientError = decode_instances(partial.instances, frames)[0] if partial.instances \
                else {}
        except ServingError as error:
            values = ClientError(error.code, f"a partial answer could not be read: {error.message}")
        self._put((partial.seq, values))

    def _accept(self, item: Any) -> Instance | None:
        """The next partial's values, None at the end; raises the request's error (and cancels it on a gap)."""
        if item is _END:
            self._ended = True
            self._final()  # raises the request's error, if it ended with one
            return None
        seq, values = item
        if isinstance(values, ClientError):
            self.close()
            raise values
        if seq != self._expected:
            self.close()
            raise ClientError(ErrorCode.INTERNAL, f"the stream lost its order: partial {seq} came where "
                                                  f"{self._expected} was due")
        self._expected += 1
        return values

    def _final(self) -> Instance:
        assert self._future is not None and self._future.done()
        if self._future.cancelled():
            raise ClientError(ErrorCode.CANCELLED, "the stream was closed before its answer came")
        return self._future.result()[0]

    def close(self) -> None:
        """Cancel the request unless it is answered (CANCEL: the worker stops generating)."""
        if self._future is not None and not self._future.done():
            self._future.cancel()


class InferStream(_Stream):
    """A streamed answer (`Client.infer_stream`): iterate it for the partial answers, `result()` for the final
    outputs. Leaving the loop early, `close()` or leaving a `with` block cancels the request."""

    def __init__(self) -> None:
        super().__init__()
        self._items: queue.SimpleQueue = queue.SimpleQueue()

    def _put(self, item: Any) -> None:
        self._items.put(item)

    def __iter__(self) -> Iterator[Instance]:
        try:
            while not self._ended and (values := self._accept(self._get())) is not None:
                yield values
        finally:
            self.close()

    def _get(self) -> Any:
        while True:  # in short waits, so Ctrl-C is seen; the IO thread always ends the request by its deadline
            with contextlib.suppress(queue.Empty):
                return self._items.get(timeout=0.5)

    def result(self) -> Instance:
        """The final outputs, once the request is answered (partials not read are skipped)."""
        assert self._future is not None
        with contextlib.suppress(CancelledError):
            self._future.exception()  # waits
        return self._final()

    def __enter__(self) -> InferStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncInferStream(_Stream):
    """`InferStream` for asyncio (`Client.infer_stream_async`): `async for` over the partial answers, then
    `await result()`. Leaving the loop early or `close()` cancels the request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self._items: asyncio.Queue = asyncio.Queue()

    def _put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody reads this stream any more
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)

    async def __aiter__(self) -> AsyncIterator[Instance]:
        try:
            while not self._ended and (values := self._accept(await self._items.get())) is not None:
                yield values
        finally:
            self.close()

    async def result(self) -> Instance:
        """The final outputs, once the request is answered; a task cancelled while it waits cancels the request."""
        assert self._future is not None
        try:
            await asyncio.wait([asyncio.wrap_future(self._future)])  # returns, never raises, when it is answered
        except asyncio.CancelledError:
            self.close()
            raise
        return self._final()

    async def __aenter__(self) -> AsyncInferStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# ---- generation ---------------------------------------------------------------------------------------------
SAMPLING_DTYPES: dict[str, type[np.generic]] = {
    "max_tokens": np.int32, "temperature": np.float32, "top_k": np.int32, "top_p": np.float32,
    "frequency_penalty": np.float32, "presence_penalty": np.float32, "seed": np.int64,
}
"""A generation method's sampling inputs (zmserve.sampling.SamplingParams) and their wire dtypes; `seed` -1 is
none."""


def generation_inputs(prompt: str, **sampling: Any) -> Instance:
    """A generation method's inputs: `prompt` and every sampling value, SamplingParams' default for those not
    given (so a method that requires all of them, and one with optional inputs, both take it). An unknown name is
    a TypeError, a value out of range a ValueError (SamplingParams' checks), both before anything is sent."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    unknown = sorted(set(sampling) - set(SAMPLING_DTYPES))
    if unknown:
        raise TypeError(f"unknown sampling parameters {unknown}; known: {list(SAMPLING_DTYPES)}")
    try:
        params = SamplingParams(**sampling)
    except TypeError as error:
        raise ValueError(f"sampling parameters {sampling}: {error}") from None
    values: Instance = {"prompt": prompt}
    for name, dtype in SAMPLING_DTYPES.items():
        value = getattr(params, name)
        values[name] = np.asarray(-1 if value is None else value, dtype)
    return values


@dataclass(frozen=True)
class GenerationChunk:
    """What one step of a generation added: its new tokens, and their text ("" while a character is split)."""

    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Generation:
    """A whole generation: every token and the text, why it stopped ("length" or "stop"), and the token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def chunk_of(values: Instance) -> GenerationChunk:
    return GenerationChunk(str(values.get("text", "")), _ints(values.get("token_ids")))


def generation_of(values: Instance) -> Generation:
    token_ids = _ints(values.get("token_ids"))
    return Generation(str(values.get("text", "")), token_ids, str(values.get("finish_reason", "")),
                      int(values.get("prompt_tokens", 0)),  # type: ignore[arg-type]
                      int(values.get("completion_tokens", len(token_ids))))  # type: ignore[arg-type]


def _ints(value: Any) -> list[int]:
    return [] if value is None else np.asarray(value).reshape(-1).astype(int).tolist()


class GenerationStream:
    """`Client.generate`'s answer: iterate it for `GenerationChunk`s as tokens come, `result()` for the whole
    `Generation`. Leaving the loop early, `close()` or leaving a `with` block cancels the request."""

    def __init__(self, stream: InferStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[GenerationChunk]:
        chunks = iter(self.stream)
        try:
            for values in chunks:
                yield chunk_of(values)
        finally:
            chunks.close()  # type: ignore[attr-defined]

    def result(self) -> Generation:
        return generation_of(self.stream.result())

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGenerationStream:
    """`GenerationStream` for asyncio (`Client.generate_async`)."""

    def __init__(self, stream: AsyncInferStream) -> None:
        self.stream = stream

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        chunks = aiter(self.stream)
        try:
            async for values in chunks:
                yield chunk_of(values)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def result(self) -> Generation:
        return generation_of(await self.stream.result())

    def close(self) -> None:
        self.stream.close()


def infer_when_ready(client: Client, instances: Instance | list[Instance], ready_within: float = 300.0,
                     timeout: float = DEFAULT_TIMEOUT_S,
                     on_wait: Callable[[ClientError], None] | None = None) -> list[Instance]:
    """`client.infer`, for a script started together with its servers: while the servable is not serving yet
    (UNAVAILABLE, or NOT_FOUND before its worker registered) the call is made again every half second, for up to
    `ready_within` seconds; `on_wait` sees each such answer whose message differs from the one before (e.g.
    "waiting for agents: 5/8 registered"). Any other error is raised at once, so a broker that does not answer
    fails after `timeout` like any call."""
    give_up = time.monotonic() + ready_within
    said = None
    while True:
        try:
            return client.infer(instances, timeout=timeout)
        except ClientError as error:
            if error.code not in NOT_SERVING_YET or time.monotonic() + RETRY_WHILE_STARTING_S > give_up:
                raise
            if on_wait is not None and error.message != said:
                on_wait(error)
            said = error.message
        time.sleep(RETRY_WHILE_STARTING_S)

