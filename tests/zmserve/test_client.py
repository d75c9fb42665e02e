"""The client never hangs: bad addresses fail at once, deadlines end calls at the deadline, a failed IO thread
answers every pending request. A raw ROUTER in the test plays the broker."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from zmserve.client import Client, ClientError, IOThread, broker_endpoint, infer_when_ready
from zmserve.codec import encode_instances
from zmserve.protocol import Cancel, Error, ErrorCode, Reply, Request, decode, encode
from zmserve.transport import free_port

ONES = {"x": np.ones((2, 3), np.float32)}


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:notaport", "http://127.0.0.1:5500", "",
                                     "127.0.0.1:70000", "tcp://127.0.0.1", "udp://127.0.0.1:5500", "ipc://"])
def test_a_bad_address_is_a_value_error_naming_the_accepted_forms(address: str) -> None:
    with pytest.raises(ValueError, match=r"is not one of host:port, tcp://host:port or ipc://path"):
        Client(address, "s", "m")


@pytest.mark.parametrize(("address", "endpoint"), [
    ("127.0.0.1:5500", "tcp://127.0.0.1:5500"), ("localhost:5500", "tcp://localhost:5500"),
    ("tcp://127.0.0.1:5500", "tcp://127.0.0.1:5500"), ("ipc:///tmp/zmserve.sock", "ipc:///tmp/zmserve.sock"),
    ("[::1]:5500", "tcp://[::1]:5500"),
])
def test_accepted_address_forms(address: str, endpoint: str) -> None:
    assert broker_endpoint(address) == endpoint


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_a_timeout_that_is_not_positive_is_a_value_error(timeout: float) -> None:
    with Client(f"127.0.0.1:{free_port()}", "s", "m") as client:
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            client.infer(ONES, timeout=timeout)
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            client.infer_async(ONES, timeout=timeout).result()


class FakeBroker:
    """A ROUTER that hands each request to the test and sends what the test tells it to."""

    def __init__(self) -> None:
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.address = f"127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"

    def receive(self, timeout_s: float = 5.0) -> tuple[bytes, Request]:
        identity, message = self.receive_message(timeout_s)
        assert isinstance(message, Request), message
        return identity, message

    def receive_message(self, timeout_s: float = 5.0) -> tuple[bytes, Request | Cancel]:
        assert self.socket.poll(int(timeout_s * 1000)), "no message arrived"
        identity, header, *_ = self.socket.recv_multipart()
        return identity, decode(header, Request, Cancel)

    def reply(self, identity: bytes, request_id: int, value: np.ndarray) -> None:
        specs, frames = encode_instances([{"y": value}])
        self.socket.send_multipart([identity, encode(Reply(id=request_id, instances=specs)), *frames])

    def error(self, identity: bytes, request_id: int, code: ErrorCode, message: str) -> None:
        self.socket.send_multipart([identity, encode(Error(id=request_id, code=code, message=message))])

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    fake = FakeBroker()
    yield fake
    fake.close()


def test_infer_ends_at_its_deadline_when_nothing_answers(broker: FakeBroker) -> None:
    with Client(broker.address, "s", "m") as client:
        started = time.monotonic()
        with pytest.raises(ClientError) as caught:
            client.infer(ONES, timeout=0.3)
        waited = time.monotonic() - started
    assert caught.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert f"no reply before the deadline (0.3 s) from tcp://{broker.address}" in caught.value.message
    assert 0.3 <= waited < 1.0


def test_a_tiny_timeout_ends_the_call_even_when_the_answer_comes_later(broker: FakeBroker) -> None:
    with Client(broker.address, "s", "m") as client:
        future = client.infer_async(ONES, timeout=0.001)
        identity, request = broker.receive()
        with pytest.raises(ClientError) as caught:
            future.result(timeout=1)
        broker.reply(identity, request.id, np.zeros(2, np.float32))  # after the deadline: ignored
    assert caught.value.code is ErrorCode.DEADLINE_EXCEEDED


def test_results_and_errors_come_back_with_the_same_code_type(broker: FakeBroker) -> None:
    with Client(broker.address, "s", "m") as client:
        outcome: dict = {}
        caller = threading.Thread(target=lambda: outcome.setdefault("result", client.infer(ONES, timeout=5)))
        caller.start()
        identity, request = broker.receive()
        assert (request.servable, request.method, request.timeout_ms) == ("s", "m", 5000)
        broker.reply(identity, request.id, np.arange(3, dtype=np.float32))
        caller.join(5)
        np.testing.assert_array_equal(outcome["result"][0]["y"], np.arange(3, dtype=np.float32))

        future = client.infer_async(ONES, timeout=5)
        identity, request = broker.receive()
        broker.error(identity, request.id, ErrorCode.NOT_FOUND, "no such servable")
        with pytest.raises(ClientError) as caught:
            future.result(timeout=5)
    assert caught.value.code is ErrorCode.NOT_FOUND and caught.value.message == "no such servable"


def test_a_late_answer_to_an_abandoned_call_is_not_taken_for_the_next_one(broker: FakeBroker) -> None:
    with Client(broker.address, "s", "m") as client:
        with pytest.raises(ClientError):
            client.infer(ONES, timeout=0.2)
        first_identity, first = broker.receive()
        outcome: dict = {}
        caller = threading.Thread(target=lambda: outcome.setdefault("result", client.infer(ONES, timeout=5)))
        caller.start()
        identity, second = broker.receive()
        broker.reply(first_identity, first.id, np.full(2, 1.0, np.float32))
        broker.reply(identity, second.id, np.full(2, 2.0, np.float32))
        caller.join(5)
    assert second.id != first.id
    np.testing.assert_array_equal(outcome["result"][0]["y"], np.full(2, 2.0, np.float32))


class CrashingIOThread(IOThread):
    def resolve(self, frames: list[zmq.Frame]) -> None:
        raise RuntimeError("boom")


class CrashingClient(Client):
    io_thread_class = CrashingIOThread


def test_a_failed_io_thread_fails_every_pending_and_later_request(broker: FakeBroker) -> None:
    with CrashingClient(broker.address, "s", "m") as client:
        futures = [client.infer_async(ONES, timeout=30) for _ in range(3)]
        identity, request = broker.receive()
        broker.reply(identity, request.id, np.zeros(1, np.float32))  # the IO thread crashes on it
        for future in futures:
            with pytest.raises(ClientError) as caught:
                future.result(timeout=5)
            assert caught.value.code is ErrorCode.UNAVAILABLE
            assert "the client's IO thread failed: RuntimeError: boom" in caught.value.message
        with pytest.raises(ClientError, match="IO thread failed"):
            client.infer_async(ONES, timeout=30).result(timeout=5)


def test_a_closed_client_answers_at_once(broker: FakeBroker) -> None:
    client = Client(broker.address, "s", "m")
    future = client.infer_async(ONES, timeout=30)
    broker.receive()
    client.close()
    with pytest.raises(ClientError) as caught:
        future.result(timeout=5)
    assert caught.value.code is ErrorCode.UNAVAILABLE
    with pytest.raises(ClientError, match="the client is closed"):
        client.infer(ONES, timeout=1)


def test_infer_when_ready_waits_while_the_servable_starts(broker: FakeBroker) -> None:
    """Answers that mean 'not serving yet' are retried and reported once per distinct message; the call that
    finally reaches the model returns its result."""
    answers = [(ErrorCode.NOT_FOUND, "servable 's' is not served"), (ErrorCode.UNAVAILABLE, "waiting: 1/2"),
               (ErrorCode.UNAVAILABLE, "waiting: 1/2"), (ErrorCode.UNAVAILABLE, "forming groups")]

    def play() -> None:
        for code, message in answers:
            identity, request = broker.receive()
            broker.error(identity, request.id, code, message)
        identity, request = broker.receive()
        broker.reply(identity, request.id, np.full((1,), 7.0, np.float32))

    player = threading.Thread(target=play)
    player.start()
    seen: list[str] = []
    with Client(broker.address, "s", "m") as client:
        result = infer_when_ready(client, ONES, ready_within=30, timeout=5, on_wait=lambda e: seen.append(e.message))
    player.join()
    assert result[0]["y"].tolist() == [7.0]
    assert seen == ["servable 's' is not served", "waiting: 1/2", "forming groups"]


def test_infer_when_ready_raises_other_errors_and_gives_up_in_time(broker: FakeBroker) -> None:
    def play(code: ErrorCode, times: int) -> None:
        for _ in range(times):
            identity, request = broker.receive()
            broker.error(identity, request.id, code, "no")

    with Client(broker.address, "s", "m") as client:
        player = threading.Thread(target=play, args=(ErrorCode.INVALID_ARGUMENT, 1))
        player.start()
        with pytest.raises(ClientError) as caught:
            infer_when_ready(client, ONES, ready_within=30, timeout=5)
        player.join()
        assert caught.value.code == ErrorCode.INVALID_ARGUMENT
        player = threading.Thread(target=play, args=(ErrorCode.UNAVAILABLE, 3))
        player.start()
        started = time.monotonic()
        with pytest.raises(ClientError) as caught:
            infer_when_ready(client, ONES, ready_within=1.2, timeout=5)
        player.join()
        assert caught.value.code == ErrorCode.UNAVAILABLE and time.monotonic() - started < 1.5

def test_a_cancelled_future_tells_the_broker_and_ignores_a_late_answer(broker: FakeBroker) -> None:
    with Client(broker.address, "s", "m") as client:
        kept, dropped = client.infer_async(ONES, timeout=30), client.infer_async(ONES, timeout=30)
        (_, first), (identity, second) = broker.receive(), broker.receive()
        assert dropped.cancel()
        _, cancel = broker.receive_message()
        assert cancel == Cancel(id=second.id)
        broker.reply(identity, second.id, np.zeros(1, np.float32))  # answered anyway: nobody takes it
        broker.reply(identity, first.id, np.ones(1, np.float32))
        np.testing.assert_array_equal(kept.result(timeout=5)[0]["y"], np.ones(1, np.float32))
        assert dropped.cancelled()
        assert not kept.cancel(), "a resolved future cannot be cancelled, so it sends nothing"
        assert not broker.socket.poll(200), "only one cancel"


def test_closing_a_client_cancels_what_it_still_waits_for(broker: FakeBroker) -> None:
    client = Client(broker.address, "s", "m")
    futures = [client.infer_async(ONES, timeout=30) for _ in range(3)]
    identity, answered = broker.receive()
    broker.receive(), broker.receive()
    broker.reply(identity, answered.id, np.zeros(1, np.float32))
    futures[0].result(timeout=5)
    client.close()
    cancels = sorted(broker.receive_message()[1].id for _ in range(2))
    assert cancels == [answered.id + 1, answered.id + 2]
    assert not broker.socket.poll(200)


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raising KeyboardInterrupt, as in a program started from a terminal. A test runner started in the
    background by a shell without job control inherits SIGINT *ignored*, and Python then installs no handler (the
    cause of this test's failures in some full runs): set it for the test, restore it after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("sigint_raises")
def test_an_interrupted_infer_cancels_its_request(broker: FakeBroker) -> None:
    """Ctrl-C while `infer` waits: a real SIGINT to this (main) thread; the request is cancelled on the way out."""
    with Client(broker.address, "s", "m") as client:
        interrupt = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
        interrupt.start()
        with pytest.raises(KeyboardInterrupt):
            client.infer(ONES, timeout=30)
        interrupt.join()
        _, request = broker.receive()
        _, cancel = broker.receive_message()
    assert cancel == Cancel(id=request.id)
