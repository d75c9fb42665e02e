"""Replicas behind one broker, with scripted workers: a real Broker on a thread, and workers that are plain
DEALERs speaking the worker protocol (so a test decides exactly when a worker answers, says it started a request,
drains or dies). Routing (least outstanding, version 0 = newest ready), retry on replica loss (PROTOCOL.md §4.10)
and the drain handshake, each checked message by message. No MindSpore and no process: the fast tier."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
import zmq

from tests.cluster import wait_for
from zmserve.client import Client, ClientError
from zmserve.codec import encode_instances
from zmserve.logs import flush_bursts
from zmserve.protocol import (
    BrokerCommand,
    DrainAck,
    ErrorCode,
    Heartbeat,
    Reply,
    Request,
    RequestsStarted,
    Retry,
    WorkerDisconnect,
    WorkerStatus,
    decode,
    encode,
    error_frame,
)
from zmserve.transport import free_port, new_socket, read_pending, recv_frames, send_frames
from zmserve_services.broker.broker import Broker

X = {"x": np.ones((2, 3), np.float32)}


class ScriptedWorker:
    """A worker of servable "m" as the broker sees one: its status, the requests it receives, its answers."""

    def __init__(self, context: zmq.Context, broker: str, version: int = 1, ready: bool = True,
                 retry: Retry = Retry.BEFORE_MODEL) -> None:
        self.socket = new_socket(context, zmq.DEALER)
        self.socket.connect(broker)
        self.version, self.retry = version, retry
        self.status(ready)

    def status(self, ready: bool, draining: bool = False) -> None:
        status = WorkerStatus(servable="m", version=self.version, methods=["predict"], ready=ready,
                              reason="" if ready else "forming groups", draining=draining, retry=self.retry)
        send_frames(self.socket, [BrokerCommand.CONTROL, encode(status)])

    def receive(self, timeout: float = 5.0) -> tuple[bytes, Request, list[zmq.Frame]]:
        """The next request the broker hands this worker (heartbeats and other control messages skipped)."""
        deadline = time.monotonic() + timeout
        while self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            frames = recv_frames(self.socket)
            if frames[0].bytes == BrokerCommand.REQUEST:
                return frames[1].bytes, decode(frames[2], Request), frames[3:]
        raise AssertionError("no request reached this worker")

    def control(self, timeout: float = 5.0) -> object:
        """The next control message other than a heartbeat."""
        deadline = time.monotonic() + timeout
        while self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            frames = recv_frames(self.socket)
            if frames[0].bytes == BrokerCommand.CONTROL:
                message = decode(frames[1])
                if not isinstance(message, Heartbeat):
                    return message
        raise AssertionError("no control message reached this worker")

    def nothing_received(self, within: float = 0.3) -> bool:
        """True when no request arrives within `within` seconds (heartbeats do not count)."""
        deadline = time.monotonic() + within
        while self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            if recv_frames(self.socket)[0].bytes == BrokerCommand.REQUEST:
                return False
        return True

    def reply(self, client: bytes, request: Request, value: float) -> None:
        specs, frames = encode_instances([{"y": np.full((2,), value, np.float32)}])
        send_frames(self.socket, [BrokerCommand.REPLY, client, encode(Reply(id=request.id, instances=specs)),
                                  *frames])

    def fail(self, client: bytes, request: Request, code: ErrorCode, message: str) -> None:
        send_frames(self.socket, [BrokerCommand.REPLY, client, error_frame(request.id, code, message)])

    def started(self, client: bytes, request: Request) -> None:
        send_frames(self.socket, [BrokerCommand.CONTROL, encode(RequestsStarted(clients=[client], ids=[request.id]))])

    def die(self) -> None:
        """Like a killed process: the connection closes, nothing more is said."""
        self.socket.close(linger=0)


@pytest.fixture
def broker() -> Iterator[tuple[Broker, zmq.Context]]:
    context = zmq.Context()
    service = Broker(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", context=context)
    thread = threading.Thread(target=service.run)
    thread.start()
    try:
        yield service, context
    finally:
        service.stop()
        thread.join(timeout=10)
        context.destroy(linger=0)  # the scripted workers' sockets too
        flush_bursts(final=True)  # now, while pytest still captures stderr (not at exit, when it is closed)


def workers(broker: tuple[Broker, zmq.Context], count: int, **options: Any) -> list[ScriptedWorker]:
    service, context = broker
    scripted = [ScriptedWorker(context, service.worker_endpoint, **options) for _ in range(count)]
    wait_for(lambda: len(service.workers) == count, timeout=5, what="the workers to register")
    return scripted


def client(broker: tuple[Broker, zmq.Context], retry: str | None = None, version: int = 0) -> Client:
    service, context = broker
    return Client(service.client_endpoint, "m", "predict", version, context=context, retry=retry)


def answer(future: Future, timeout: float = 5.0) -> float | str:
    """The result's first value, or the error code."""
    try:
        return float(future.result(timeout)[0]["y"][0])
    except ClientError as error:
        return str(error.code)


def which(scripted: list[ScriptedWorker]) -> tuple[ScriptedWorker, bytes, Request]:
    """The worker the broker handed the one pending request to."""
    poller = zmq.Poller()
    for worker in scripted:
        poller.register(worker.socket, zmq.POLLIN)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for sock, _ in poller.poll(100):
            worker = next(w for w in scripted if w.socket is sock)
            frames = recv_frames(sock)
            if frames[0].bytes == BrokerCommand.REQUEST:
                return worker, frames[1].bytes, decode(frames[2], Request)
    raise AssertionError("the request reached no worker")


def test_ties_are_taken_in_turn_so_sequential_calls_reach_both_replicas(broker) -> None:
    scripted = workers(broker, 2)
    seen = []
    with client(broker) as c:
        for i in range(6):
            future = c.infer_async(X, timeout=5)
            worker, identity, request = which(scripted)
            seen.append(scripted.index(worker))
            worker.reply(identity, request, i)
            assert answer(future) == i
    assert seen.count(0) == 3 and seen.count(1) == 3, seen


def test_the_replica_with_fewer_requests_outstanding_takes_the_next(broker) -> None:
    scripted = workers(broker, 2)
    with client(broker) as c:
        first = c.infer_async(X, timeout=5)
        busy, identity, request = which(scripted)
        idle = next(w for w in scripted if w is not busy)
        for value in (7, 8, 9):  # busy holds one, idle none: each next request goes to idle
            future = c.infer_async(X, timeout=5)
            client_identity, held, _ = idle.receive()
            idle.reply(client_identity, held, value)
            assert answer(future) == value
        assert busy.nothing_received(0.1)
        busy.reply(identity, request, 1)
        assert answer(first) == 1


def test_a_request_held_by_a_lost_worker_is_answered_by_the_other_replica(broker) -> None:
    scripted = workers(broker, 2)
    with client(broker) as c:
        future = c.infer_async(X, timeout=5)
        holder, _, request = which(scripted)
        other = next(w for w in scripted if w is not holder)
        holder.die()
        identity, again, _ = other.receive()
        assert again.id == request.id and again.retry is None
        assert 0 < again.timeout_ms < request.timeout_ms  # sent again with the time left
        other.reply(identity, again, 42)
        assert answer(future) == 42


@pytest.mark.parametrize(("servable_policy", "request_policy", "retried"), [
    ("before_model", None, False), ("before_model", "until_result", True), ("until_result", None, True),
    ("until_result", "before_model", False)])
def test_a_request_that_reached_the_model_is_sent_again_only_until_result(
        broker, servable_policy: str, request_policy: str | None, retried: bool) -> None:
    scripted = workers(broker, 2, retry=Retry(servable_policy))
    with client(broker, retry=request_policy) as c:
        future = c.infer_async(X, timeout=5)
        holder, identity, request = which(scripted)
        other = next(w for w in scripted if w is not holder)
        holder.started(identity, request)
        wait_for(lambda: broker[0].requests.get((identity, request.id)).started, timeout=5,
                 what="the broker to take REQUESTS_STARTED")
        holder.die()
        if retried:
            client_identity, again, _ = other.receive()
            other.reply(client_identity, again, 9)
            assert answer(future) == 9
        else:
            assert answer(future) == ErrorCode.UNAVAILABLE
            assert other.nothing_received()


@pytest.mark.parametrize(("servable_policy", "request_policy", "retried"), [
    ("before_model", None, True), ("before_model", "never", False), ("never", None, False),
    ("never", "before_model", True)])
def test_retry_is_the_servables_choice_unless_the_request_makes_its_own(
        broker, servable_policy: str, request_policy: str | None, retried: bool) -> None:
    scripted = workers(broker, 2, retry=Retry(servable_policy))
    with client(broker, retry=request_policy) as c:
        future = c.infer_async(X, timeout=5)
        holder, _, _ = which(scripted)
        other = next(w for w in scripted if w is not holder)
        holder.die()
        if retried:
            identity, again, _ = other.receive()
            other.reply(identity, again, 3)
            assert answer(future) == 3
        else:
            assert answer(future) == ErrorCode.UNAVAILABLE
            assert other.nothing_received()


def test_unavailable_from_a_replica_sends_the_request_to_another_once(broker) -> None:
    scripted = workers(broker, 2)
    with client(broker) as c:
        future = c.infer_async(X, timeout=5)
        holder, identity, request = which(scripted)
        other = next(w for w in scripted if w is not holder)
        holder.fail(identity, request, ErrorCode.UNAVAILABLE, "restarting its agents")
        identity, again, _ = other.receive()
        other.fail(identity, again, ErrorCode.UNAVAILABLE, "restarting its agents too")
        assert answer(future) == ErrorCode.UNAVAILABLE  # each replica once: no ping-pong
        assert holder.nothing_received()


def test_other_errors_are_answered_as_they_are(broker) -> None:
    scripted = workers(broker, 2)
    with client(broker) as c:
        future = c.infer_async(X, timeout=5)
        holder, identity, request = which(scripted)
        holder.fail(identity, request, ErrorCode.INVALID_ARGUMENT, "bad input")
        assert answer(future) == ErrorCode.INVALID_ARGUMENT
        assert all(w.nothing_received(0.1) for w in scripted)


def test_with_no_other_replica_a_lost_request_is_unavailable_at_once(broker) -> None:
    (only,) = workers(broker, 1)
    with client(broker) as c:
        future = c.infer_async(X, timeout=30)
        only.receive()
        started = time.monotonic()
        only.die()
        assert answer(future) == ErrorCode.UNAVAILABLE
        assert time.monotonic() - started < 5  # removed at the next send (heartbeat), not at the deadline


def test_a_reply_from_a_worker_that_no_longer_holds_the_request_is_dropped(broker) -> None:
    scripted = workers(broker, 2)
    with client(broker) as c:
        future = c.infer_async(X, timeout=5)
        holder, identity, request = which(scripted)
        other = next(w for w in scripted if w is not holder)
        holder.fail(identity, request, ErrorCode.UNAVAILABLE, "not serving")
        identity, again, _ = other.receive()
        holder.reply(identity, request, -1)  # a stale answer from the first: not the request's answer any more
        holder.status(ready=False)  # behind the stale answer on the same connection: seen => the answer was read
        wait_for(lambda: sum(w.ready for w in broker[0].workers.values()) == 1, timeout=5,
                 what="the broker to read the stale answer and the status behind it")
        other.reply(identity, again, 5)
        assert answer(future) == 5


def test_version_zero_is_the_newest_version_with_a_ready_worker(broker) -> None:
    service, context = broker
    v1 = ScriptedWorker(context, service.worker_endpoint, version=1)
    v2 = ScriptedWorker(context, service.worker_endpoint, version=2, ready=False)
    wait_for(lambda: len(service.workers) == 2, timeout=5, what="both versions to register")
    with client(broker) as c:
        future = c.infer_async(X, timeout=5)
        identity, request, _ = v1.receive()  # v2 is still forming its groups: v1 keeps the traffic
        v1.reply(identity, request, 1)
        assert answer(future) == 1
        v2.status(ready=True)
        wait_for(lambda: all(w.ready for w in service.workers.values()), timeout=5, what="v2 ready")
        future = c.infer_async(X, timeout=5)
        identity, request, _ = v2.receive()
        v2.reply(identity, request, 2)
        assert answer(future) == 2
    with client(broker, version=1) as pinned:
        future = pinned.infer_async(X, timeout=5)
        identity, request, _ = v1.receive()  # an explicit version is served by that version only
        v1.reply(identity, request, 1)
        assert answer(future) == 1


def test_version_zero_while_no_version_is_ready_says_why(broker) -> None:
    workers(broker, 1, ready=False)
    with client(broker) as c:
        assert answer(c.infer_async(X, timeout=5)) == ErrorCode.UNAVAILABLE
        with pytest.raises(ClientError, match="forming groups"):
            c.infer(X, timeout=5)


def test_a_draining_worker_is_acknowledged_and_routed_nothing_more(broker) -> None:
    service, _ = broker
    draining, staying = workers(broker, 2)
    with client(broker) as c:
        held = c.infer_async(X, timeout=5)
        holder, identity, request = which([draining, staying])
        if holder is staying:  # make the draining one the holder, for the test's story
            draining, staying = staying, draining
        draining.status(ready=False, draining=True)
        assert isinstance(draining.control(), DrainAck)
        futures = [c.infer_async(X, timeout=5) for _ in range(4)]
        for _ in futures:
            client_identity, request_2, _ = staying.receive()
            staying.reply(client_identity, request_2, 2)
        assert [answer(f) for f in futures] == [2, 2, 2, 2]
        draining.reply(identity, request, 1)  # what it held is still its to answer
        assert answer(held) == 1
        send_frames(draining.socket, [BrokerCommand.CONTROL, encode(WorkerDisconnect())])
        wait_for(lambda: len(service.workers) == 1, timeout=5, what="the drained worker to leave")


def test_a_broker_loop_that_stalled_judges_workers_by_what_waits_for_it() -> None:
    """A broker whose loop was not scheduled for longer than the liveness window (a loaded machine) must not
    remove a worker whose status is waiting in its socket: it reads it first. A worker that said nothing is
    removed."""
    context = zmq.Context()
    service = Broker(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", context=context)
    try:
        talking = ScriptedWorker(context, service.worker_endpoint)
        silent = ScriptedWorker(context, service.worker_endpoint)
        wait_for(lambda: read_pending(service.worker_socket, service.process_worker) or len(service.workers) == 2,
                 timeout=5, what="both workers to register")
        for record in service.workers.values():  # the loop "stalls": nothing read for 10 s
            record.liveness.last_heard -= 10
        talking.status(ready=True)
        wait_for(lambda: service.worker_socket.poll(0), timeout=5, what="the status to wait in the socket")
        service.scan.next_at = 0
        service.do_chores()
        assert len(service.workers) == 1  # the silent one is gone, the one whose status was waiting stays
        (kept,) = service.workers.values()
        assert not kept.liveness.expired()
        del silent
    finally:
        service.close_sockets()
        context.destroy(linger=0)
        flush_bursts(final=True)
