"""The broker's STATUS answer, with no zmserve process: a real Broker on its own thread, a DEALER playing a worker
(WORKER_STATUS in, requests answered), and `zmserve status`'s StatusClient asking over the client socket."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import zmq

from tests.cluster import wait_for
from zmserve.protocol import (
    AgentStatus,
    BrokerCommand,
    Error,
    ErrorCode,
    Reply,
    Request,
    Status,
    WorkerStatus,
    decode,
    encode,
)
from zmserve.status import StatusClient, StatusUnavailable, query_status, render
from zmserve_services.broker.broker import Broker

AGENTS = [AgentStatus(rank=0, stage=0, state="ready", host="h0", pid=100, heartbeat_age=0.2),
          AgentStatus(rank=1, stage=0, state="ready", host="h0", pid=101, heartbeat_age=0.4),
          AgentStatus(rank=2, stage=1, state="restarting", host="h1", pid=102, restarts=1),
          AgentStatus(rank=3, stage=1, state="missing")]


class FakeWorker:
    """A DEALER on the broker's worker socket that reports a status and answers every request it is handed."""

    def __init__(self, context: zmq.Context, address: str, ready: bool = True) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.connect(address)
        self.ready = ready

    def report(self) -> None:
        status = WorkerStatus(servable="mlp", version=2, methods=["predict", "embed"], ready=self.ready,
                              reason="" if self.ready else "waiting for agents: 2/4 registered",
                              state="serving" if self.ready else "waiting_for_agents",
                              address="127.0.0.1:6200", host="box", pid=4242, agents=AGENTS, requests=3, queued=1,
                              calls_in_flight=2)
        self.socket.send_multipart([BrokerCommand.CONTROL, encode(status)])

    def answer(self, code: ErrorCode | None = None) -> None:
        frames = self.socket.recv_multipart()
        while frames[0] != BrokerCommand.REQUEST:  # the broker's heartbeats
            frames = self.socket.recv_multipart()
        client, header = frames[1:3]
        request = decode(header, Request)
        answer = Reply(id=request.id) if code is None else Error(id=request.id, code=code, message="test")
        self.socket.send_multipart([BrokerCommand.REPLY, client, encode(answer)])


@pytest.fixture
def broker() -> Iterator[Broker]:
    service = Broker("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    yield service
    service.stop()
    thread.join(timeout=10)


def test_status_reports_what_workers_said_and_the_traffic_the_broker_routed(broker: Broker) -> None:
    context = zmq.Context.instance()
    worker = FakeWorker(context, broker.worker_endpoint)
    worker.report()
    status = wait_for(lambda: (s := query_status(broker.client_endpoint)).workers and s, timeout=5,
                      what="the worker in the status")
    (info,) = status.workers
    assert (info.servable, info.version, info.ready, info.state) == ("mlp", 2, True, "serving")
    assert (info.address, info.host, info.pid, info.methods) == ("127.0.0.1:6200", "box", 4242, ["predict", "embed"])
    assert info.agents == AGENTS
    assert (info.requests, info.queued, info.calls_in_flight, info.in_flight) == (3, 1, 2, 0)
    assert 0 <= info.status_age < 5
    assert [(s.servable, s.version, s.methods, s.ready) for s in status.servables] == [("mlp", 2, ["predict", "embed"],
                                                                                       True)]

    client = context.socket(zmq.DEALER)
    client.linger = 0
    client.connect(broker.client_endpoint)
    for request_id, code in enumerate([None, None, None, ErrorCode.INVALID_ARGUMENT]):
        client.send(encode(Request(id=request_id, servable="mlp", method="predict")))
        worker.answer(code)
        assert client.poll(5000)
        client.recv_multipart()
    client.send(encode(Request(id=99, servable="mlp", method="nosuch")))  # NOT_FOUND by the broker: an error
    assert client.poll(5000)
    assert decode(client.recv_multipart()[0], Error).code == ErrorCode.NOT_FOUND

    status = query_status(broker.client_endpoint)
    (traffic,) = status.traffic
    assert (traffic.servable, traffic.requests, traffic.errors, traffic.window_s) == ("mlp", 5, 2, 60.0)
    assert traffic.p50_ms is not None and 0 < traffic.p50_ms <= traffic.p99_ms < 5000
    assert sum(point.requests for point in traffic.series) == 5
    assert len(traffic.series) == 60 and traffic.step_s == 5
    assert status.in_flight == 0 and status.uptime_s > 0

    text = render(status, broker.client_endpoint)
    assert "mlp" in text and "predict,embed" in text and "restarting" in text and "4242" in text
    client.close()
    worker.socket.close()


def test_status_says_why_a_worker_is_not_ready_and_forgets_a_silent_one() -> None:
    service = Broker("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", heartbeat_interval=0.1)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    worker = FakeWorker(zmq.Context.instance(), service.worker_endpoint, ready=False)
    try:
        worker.report()
        status = wait_for(lambda: (s := query_status(service.client_endpoint)).workers and s, timeout=5,
                          what="the worker in the status")
        assert not status.workers[0].ready and status.workers[0].reason == "waiting for agents: 2/4 registered"
        assert "NOT READY: waiting for agents" in render(status, "b")
        # silent for 3 heartbeat intervals (0.3 s): forgotten, and its servable listed as lost
        status = wait_for(lambda: not (s := query_status(service.client_endpoint)).workers and s, timeout=5,
                          what="the worker forgotten")
        assert status.lost == ["mlp"]
    finally:
        worker.socket.close()
        service.stop()
        thread.join(timeout=10)


def test_no_broker_is_one_line_after_the_timeout() -> None:
    from zmserve.transport import free_port

    client = StatusClient(f"127.0.0.1:{free_port()}")
    try:
        with pytest.raises(StatusUnavailable, match=r"no answer from the broker at tcp://127\.0\.0\.1:\d+ within 0\.2"):
            client.query(0.2)
    finally:
        client.close()


def test_status_answer_round_trips() -> None:
    status = Status(id=1, uptime_s=2.5, in_flight=0)
    assert decode(encode(status), Status) == status
