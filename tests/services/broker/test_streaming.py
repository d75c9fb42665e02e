"""The broker and streamed requests (PROTOCOL.md §4.11), with scripted peers: a real Broker on a thread, workers and
a client that are plain DEALERs, so each test decides exactly what is sent when. PARTIALs reach the client in order
and the request stays open for its one REPLY or ERROR; a streamed request is never sent to another replica once a
partial reached its client; a cancel mid-stream reaches the worker and later partials are dropped."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from tests.cluster import wait_for
from zmserve.codec import decode_instances, encode_instances
from zmserve.logs import flush_bursts
from zmserve.protocol import (
    BrokerCommand,
    Cancel,
    Error,
    ErrorCode,
    Heartbeat,
    Partial,
    Reply,
    Request,
    Retry,
    WorkerDisconnect,
    WorkerStatus,
    decode,
    encode,
)
from zmserve.transport import free_port, new_socket, recv_frames, send_frames
from zmserve_services.broker.broker import Broker


class Peer:
    """A DEALER that waits for the next message it cares about (heartbeats skipped)."""

    def __init__(self, context: zmq.Context, address: str) -> None:
        self.socket = new_socket(context, zmq.DEALER)
        self.socket.connect(address)

    def next(self, timeout: float = 5.0) -> list[zmq.Frame]:
        deadline = time.monotonic() + timeout
        while self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            frames = recv_frames(self.socket)
            if frames[0].bytes == BrokerCommand.CONTROL and isinstance(decode(frames[1]), Heartbeat):
                continue
            return frames
        raise AssertionError("nothing arrived")

    def quiet(self, within: float = 0.3) -> bool:
        """True when nothing but heartbeats arrives within `within` seconds."""
        try:
            self.next(within)
        except AssertionError:
            return True
        return False


class Worker(Peer):
    def __init__(self, context: zmq.Context, address: str) -> None:
        super().__init__(context, address)
        status = WorkerStatus(servable="m", version=1, methods=["generate"], ready=True, retry=Retry.UNTIL_RESULT)
        send_frames(self.socket, [BrokerCommand.CONTROL, encode(status)])

    def request(self) -> tuple[bytes, Request]:
        frames = self.next()
        assert frames[0].bytes == BrokerCommand.REQUEST
        return frames[1].bytes, decode(frames[2], Request)

    def partial(self, client: bytes, request: Request, seq: int, text: str) -> None:
        specs, frames = encode_instances([{"text": text, "token_ids": np.array([seq], np.int32)}])
        send_frames(self.socket, [BrokerCommand.REPLY, client, encode(Partial(id=request.id, seq=seq,
                                                                               instances=specs)), *frames])

    def reply(self, client: bytes, request: Request, text: str) -> None:
        specs, frames = encode_instances([{"text": text}])
        send_frames(self.socket, [BrokerCommand.REPLY, client, encode(Reply(id=request.id, instances=specs)),
                                  *frames])


class Caller(Peer):
    def send(self, request_id: int, stream: bool = True) -> None:
        specs, frames = encode_instances([{"prompt": "hi"}])
        send_frames(self.socket, [encode(Request(id=request_id, servable="m", method="generate", timeout_ms=5000,
                                                 instances=specs, stream=stream)), *frames])

    def answer(self) -> tuple[Partial | Reply | Error, list[dict[str, Any]]]:
        frames = self.next()
        header = decode(frames[0], Partial, Reply, Error)
        values = [] if isinstance(header, Error) else decode_instances(header.instances, frames[1:])
        return header, values


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
        context.destroy(linger=0)
        flush_bursts(final=True)


def peers(broker: tuple[Broker, zmq.Context], workers: int) -> tuple[Caller, list[Worker]]:
    service, context = broker
    scripted = [Worker(context, service.worker_endpoint) for _ in range(workers)]
    wait_for(lambda: len(service.workers) == workers, timeout=5, what="the workers to register")
    return Caller(context, service.client_endpoint), scripted


def which(workers: list[Worker]) -> tuple[Worker, Worker, bytes, Request]:
    """The one of two workers the broker handed the request to, the other one, and the request."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for worker in workers:
            if worker.socket.poll(20):
                frames = recv_frames(worker.socket)
                if frames[0].bytes == BrokerCommand.REQUEST:
                    other = next(w for w in workers if w is not worker)
                    return worker, other, frames[1].bytes, decode(frames[2], Request)
    raise AssertionError("the request reached no worker")


def test_partials_reach_the_client_in_order_and_the_request_stays_open_for_its_reply(broker) -> None:
    caller, (worker,) = peers(broker, 1)
    caller.send(1)
    client, request = worker.request()
    assert request.stream is True
    for seq, text in enumerate(["a", "b", "c"]):
        worker.partial(client, request, seq, text)
    got = [caller.answer() for _ in range(3)]
    assert [(type(h).__name__, h.seq, v[0]["text"]) for h, v in got] == [("Partial", 0, "a"), ("Partial", 1, "b"),
                                                                         ("Partial", 2, "c")]
    assert broker[0].requests.get((client, 1)) is not None, "a partial does not end the request"
    worker.reply(client, request, "abc")
    header, values = caller.answer()
    assert isinstance(header, Reply) and values == [{"text": "abc"}]
    worker.partial(client, request, 3, "late")
    worker.reply(client, request, "twice")
    assert caller.quiet(), "after its one answer, nothing more of the request reaches the client"


def test_a_streamed_request_whose_replica_is_lost_ends_unavailable_and_is_not_retried(broker) -> None:
    caller, workers = peers(broker, 2)
    caller.send(1)
    chosen, other, client, request = which(workers)
    chosen.partial(client, request, 0, "a")
    assert isinstance(caller.answer()[0], Partial)
    send_frames(chosen.socket, [BrokerCommand.CONTROL, encode(WorkerDisconnect())])
    header, _ = caller.answer()
    assert isinstance(header, Error) and header.code == ErrorCode.UNAVAILABLE and "was lost" in header.message
    assert other.quiet(), "until_result would retry a plain request; a streamed one stays with its replica"


def test_a_streamed_request_with_no_partial_yet_is_retried_as_usual(broker) -> None:
    caller, workers = peers(broker, 2)
    caller.send(1)
    chosen, other, _, _ = which(workers)
    send_frames(chosen.socket, [BrokerCommand.CONTROL, encode(WorkerDisconnect())])
    client, request = other.request()
    other.partial(client, request, 0, "a")
    other.reply(client, request, "a")
    assert isinstance(caller.answer()[0], Partial) and isinstance(caller.answer()[0], Reply)


def test_a_cancel_mid_stream_reaches_the_worker_and_later_partials_are_dropped(broker) -> None:
    caller, (worker,) = peers(broker, 1)
    caller.send(1)
    client, request = worker.request()
    worker.partial(client, request, 0, "a")
    assert isinstance(caller.answer()[0], Partial)
    send_frames(caller.socket, [encode(Cancel(id=1))])
    header, _ = caller.answer()
    assert isinstance(header, Error) and header.code == ErrorCode.CANCELLED
    frames = worker.next()
    assert frames[0].bytes == BrokerCommand.CANCEL and decode(frames[2], Cancel).id == 1
    worker.partial(client, request, 1, "b")
    assert caller.quiet()


def test_a_client_gone_mid_stream_cancels_its_request_at_the_worker(broker) -> None:
    caller, (worker,) = peers(broker, 1)
    caller.send(1)
    client, request = worker.request()
    worker.partial(client, request, 0, "a")
    assert isinstance(caller.answer()[0], Partial)
    caller.socket.close(linger=0)  # the client process is gone: its connection closes
    deadline, cancelled = time.monotonic() + 5, None
    for seq in range(1, 10_000):  # the broker notices when a partial cannot be delivered (EHOSTUNREACH)
        worker.partial(client, request, seq, "b")
        while cancelled is None and worker.socket.poll(20):
            frames = recv_frames(worker.socket)
            if frames[0].bytes == BrokerCommand.CANCEL:
                cancelled = decode(frames[2], Cancel)
        if cancelled is not None:
            break
        assert time.monotonic() < deadline, "the broker never cancelled the stream of a client that is gone"
    assert cancelled is not None and cancelled.id == 1
    assert broker[0].requests.get((client, 1)) is None
