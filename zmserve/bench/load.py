"""Load against the service, from threads of this process: a closed loop (`-c N` callers, each waiting for its
answer) or an open loop (`--rate R`, Poisson arrivals sent on schedule whatever is still outstanding, so a slow
server cannot slow the offered load down, which a closed loop hides).

A closed-loop caller uses `Client.infer`, which sends and waits on the caller's own socket (as MindSpore Serving's
benchmark client does with its synchronous `Client.infer`): latency runs from just before the call to its return.
The open loop cannot wait, so it uses `Client.infer_async`: latency runs from just before that call to the moment
the client's IO thread resolves the request, so a busy sending thread adds nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from zmserve import trace as tracing
from zmserve.bench.errors import BenchError
from zmserve.bench.records import OK, Record
from zmserve.bench.requests import RequestSpec, payload_bytes
from zmserve.bench.writer import ResultWriter
from zmserve.protocol import ErrorCode
from zmserve.security import SecurityError

RESOLVE_GRACE_S = 5.0
"""How long past its own timeout a request may stay unanswered before the bench gives up on it (the client
expires requests itself; this bounds the wait even if it did not)."""
LATE = str(ErrorCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class Target:
    """Where requests go: the broker, and the servable/method a request line does not name itself."""

    address: str
    servable: str | None
    method: str
    version: int = 0
    broker_key: str | None = None
    """CURVE: the broker's public key file, with `secret_key` this client's key pair (docs/SECURITY.md)."""
    secret_key: str | None = None


@dataclass(frozen=True)
class LoadSpec:
    """How hard and how long: `concurrency` callers (closed loop) or `rate` req/s (open loop), until `requests`
    are sent or `duration` seconds passed."""

    concurrency: int | None
    rate: float | None
    requests: int | None
    duration: float | None
    timeout: float
    warmup: int
    seed: int | None = None


def request_targets(requests: list[RequestSpec], servable: str | None, method: str) -> list[tuple[str, str]]:
    """(servable, method) of each request: its line's own, else the command line's."""
    targets = []
    for number, spec in enumerate(requests, start=1):
        target = spec.servable or servable
        if target is None:
            raise BenchError(f"request {number} names no servable: give --servable or \"servable\" in the line")
        targets.append((target, spec.method or method))
    return targets


def share(total: int, parts: int, index: int) -> int:
    """Part `index`'s share of `total` when split as evenly as possible (the first parts take the remainder)."""
    return total // parts + (1 if index < total % parts else 0)


class Tickets:
    """Hands out request numbers until the request count or the duration is used up, or someone cancels."""

    def __init__(self, requests: int | None, duration: float | None) -> None:
        self.requests = requests
        self.duration = duration
        self.started = time.monotonic()
        self.issued = 0
        self.cancelled = threading.Event()
        self._lock = threading.Lock()

    def take(self, at: float | None = None) -> int | None:
        """The next request number, or None when the run is over (`at`: the monotonic time it would go out)."""
        with self._lock:
            if self.cancelled.is_set() or (self.requests is not None and self.issued >= self.requests):
                return None
            when = time.monotonic() if at is None else at
            if self.duration is not None and when - self.started >= self.duration:
                return None
            number = self.issued
            self.issued += 1
            return number


class ServiceLoad:
    """Sends requests to the broker through one `Client` per (servable, method).

    Ticket n is request number `n * stride + offset`: the record's id, and which request (line) it sends. A
    process of a `--processes` run takes one residue class, so the merged ids are unique and the lines are
    cycled as one process would."""

    def __init__(self, target: Target, requests: list[RequestSpec], timeout: float, writer: ResultWriter,
                 offset: int = 0, stride: int = 1) -> None:
        from zmserve.client import Client

        self.timeout = timeout
        self.writer = writer
        self.requests = requests
        self.offset, self.stride = offset, stride
        self.targets = request_targets(requests, target.servable, target.method)
        self.clients: dict[tuple[str, str], Any] = {}
        try:
            for each in dict.fromkeys(self.targets):
                self.clients[each] = Client(target.address, each[0], each[1], target.version,
                                            server_public_key=target.broker_key, secret_key=target.secret_key)
        except SecurityError as exc:  # one CURVE key without the other, or a key file that cannot be read
            self.close()
            raise BenchError(str(exc)) from None
        except ValueError as exc:  # an address the client refuses
            self.close()
            raise BenchError(f"--address {target.address!r}: {exc}") from None
        self.trace_every = 0
        """Trace one request in this many (closed loop; 0 = none): its record gets the hop spans."""
        self._outstanding: dict[int, tuple[Future, float, float, RequestSpec]] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def request(self, ticket: int) -> tuple[int, Any, RequestSpec]:
        """The request number of a ticket, the client to send it with, and what to send."""
        number = ticket * self.stride + self.offset
        index = number % len(self.requests)
        return number, self.clients[self.targets[index]], self.requests[index]

    def warm_up(self, count: int) -> None:
        """Unrecorded requests first, so the first recorded ones do not pay for connecting (the open loop's: its
        requests go out through the client's IO thread)."""
        for ticket in range(count):
            _, client, spec = self.request(ticket)
            future = client.infer_async(spec.instances, self.timeout)
            with contextlib.suppress(Exception):
                future.result(self.timeout + RESOLVE_GRACE_S)

    def start_callers(self, concurrency: int, warmup: int) -> Callers:
        """The closed loop's callers, started now: each warms up its own socket with its share of `warmup` (at
        least one request, which connects it), then waits for `closed_loop` to hand out tickets."""
        callers = Callers(concurrency)
        for index in range(concurrency):
            thread = threading.Thread(target=self._caller, args=(callers, max(1, share(warmup, concurrency, index))),
                                      name=f"bench-caller-{index}", daemon=True)
            callers.threads.append(thread)
            thread.start()
        return callers

    def closed_loop(self, tickets: Tickets, callers: Callers) -> None:
        """Every caller sends its next request when the previous one is answered, until the tickets run out."""
        callers.go(tickets)
        try:
            for thread in callers.threads:
                while thread.is_alive():
                    thread.join(0.1)
        finally:
            tickets.cancelled.set()
            deadline = time.monotonic() + self.timeout + 2 * RESOLVE_GRACE_S
            for thread in callers.threads:
                thread.join(max(0.0, deadline - time.monotonic()))

    def _caller(self, callers: Callers, warmup: int) -> None:
        for ticket in range(warmup):
            _, client, spec = self.request(ticket)
            with contextlib.suppress(Exception):
                client.infer(spec.instances, self.timeout)
        tickets = callers.ready_and_wait()
        while (ticket := tickets.take()) is not None:
            self.writer.sent = tickets.issued
            self.writer.put(self.call(*self.request(ticket)))

    def call(self, number: int, client: Any, spec: RequestSpec) -> Record:
        """One closed-loop request, sent and waited for on this caller's socket: its record (with its hops'
        spans when it is one of the traced ones: `--trace N`)."""
        stamps: list | None = [] if self.trace_every and number % self.trace_every == 0 else None
        send_time, started = time.time(), time.perf_counter()
        try:
            answer = client.infer(spec.instances, self.timeout, trace=stamps)
        except Exception as exc:
            return failure(number, send_time, time.perf_counter() - started, spec, exc)
        record = Record.measured(number, send_time, time.perf_counter() - started, OK, spec.bytes_out,
                                 payload_bytes(answer))
        return dataclasses.replace(record, spans=tracing.spans(stamps)) if stamps else record

    def open_loop(self, tickets: Tickets, rate: float, seed: int | None) -> None:
        """Poisson arrivals at `rate`: each request goes out at its scheduled time, answered or not; the schedule
        is absolute, so a late wake-up is made up by the next sends instead of lowering the rate."""
        rng = np.random.default_rng(seed)
        next_at = time.monotonic()
        try:
            while (ticket := tickets.take(at=next_at)) is not None:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self._send_async(ticket)
                self.writer.sent = tickets.issued
                next_at += rng.exponential(1.0 / rate)
        finally:
            tickets.cancelled.set()
            self._wait_outstanding(time.monotonic() + self.timeout + RESOLVE_GRACE_S)

    def _send_async(self, ticket: int) -> None:
        number, client, spec = self.request(ticket)
        send_time, started = time.time(), time.perf_counter()
        with self._lock:
            future = client.infer_async(spec.instances, self.timeout)
            self._outstanding[number] = (future, send_time, started, spec)
        future.add_done_callback(lambda f, n=number: self._answered(n, f))

    def _answered(self, number: int, future: Future) -> None:
        self._settle(number, lambda send_time, started, finished, spec:
                     outcome(number, send_time, finished - started, spec, future))

    def _settle(self, number: int, record: Callable[[float, float, float, RequestSpec], Record]) -> None:
        """An open-loop request is done: forget it (waking whoever waits for the last answer) and write its record,
        made by `record(send_time, started, finished, spec)`."""
        finished = time.perf_counter()
        with self._lock:
            entry = self._outstanding.pop(number, None)
            if not self._outstanding:
                self._idle.notify_all()
        if entry is not None:
            _, send_time, started, spec = entry
            self.writer.put(record(send_time, started, finished, spec))

    def _wait_outstanding(self, deadline: float) -> None:
        with self._lock:
            while self._outstanding and time.monotonic() < deadline:
                self._idle.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            late, self._outstanding = self._outstanding, {}
        now = time.perf_counter()
        for number, (_, send_time, started, spec) in sorted(late.items()):
            self.writer.put(Record.measured(number, send_time, now - started, LATE, spec.bytes_out, 0,
                                            "no answer, not even the client's timeout"))


class Callers:
    """The closed loop's caller threads: each says when it is warmed up, then waits for the run's tickets."""

    def __init__(self, count: int) -> None:
        self.threads: list[threading.Thread] = []
        self.count = count
        self.warmed = 0
        self.tickets: Tickets | None = None
        self.changed = threading.Condition()

    def ready_and_wait(self) -> Tickets:
        with self.changed:
            self.warmed += 1
            self.changed.notify_all()
            self.changed.wait_for(lambda: self.tickets is not None)
            assert self.tickets is not None
            return self.tickets

    def wait_warmed(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.warmed == self.count, timeout)

    def go(self, tickets: Tickets) -> None:
        """Hand out the tickets (a cancelled set ends the callers at once)."""
        with self.changed:
            self.tickets = tickets
            self.changed.notify_all()


def run_threads(load: ServiceLoad, spec: LoadSpec, writer: ResultWriter,
                before_start: Callable[[], bool] | None = None) -> list[Record]:
    """Warm up, then the closed or open loop from threads of this process; every record, also after Ctrl-C.
    `before_start` runs between warm-up and the first recorded send; False from it ends the run there."""
    callers: Callers | None = None
    tickets = Tickets(0, None)
    try:
        if spec.rate is None:
            callers = load.start_callers(spec.concurrency or 1, spec.warmup)
            callers.wait_warmed((spec.warmup + 1) * (spec.timeout + RESOLVE_GRACE_S))
        else:
            load.warm_up(spec.warmup)
        if before_start is None or before_start():
            writer.start()
            tickets = Tickets(spec.requests, spec.duration)
            try:
                if callers is not None:
                    load.closed_loop(tickets, callers)
                else:
                    load.open_loop(tickets, spec.rate or 0.0, spec.seed)
            except KeyboardInterrupt:
                tickets.cancelled.set()
    finally:
        tickets.cancelled.set()
        if callers is not None:
            callers.go(tickets)  # callers still waiting (the run ended before it began) see no ticket and end
        load.close()
        records = writer.finish()
    return records


def outcome(number: int, send_time: float, latency_s: float, spec: RequestSpec, future: Future) -> Record:
    """The record of a resolved request: OK with the answer's payload, or the error's code and message."""
    exc = future.exception()
    if exc is None:
        return Record.measured(number, send_time, latency_s, OK, spec.bytes_out, payload_bytes(future.result()))
    return failure(number, send_time, latency_s, spec, exc)


def failure(number: int, send_time: float, latency_s: float, spec: RequestSpec, exc: BaseException) -> Record:
    """The record of a failed request: the error's code (or its type) and message."""
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return Record.measured(number, send_time, latency_s, str(code) if code else type(exc).__name__,
                           spec.bytes_out, 0, message)
