"""The gateway against a real broker whose one worker is scripted here (a DEALER sending WORKER_STATUS, no
MindSpore): readiness as the worker's state changes, the model metadata a worker's signatures give, 503 / 429
from the broker, and 504 when there is no broker at all."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
import tritonclient.http as triton
import zmq
from tritonclient.utils import InferenceServerException

from tests.cluster import free_port
from tests.services.gateway.gateway_client import curl
from zmserve.local import LocalCluster
from zmserve.protocol import BrokerCommand, WorkerDisconnect, WorkerStatus, encode
from zmserve.transport import new_socket

pytestmark = pytest.mark.slow

SIGNATURES = {
    "predict": {"inputs": [{"name": "x", "dtype": "float32", "shape": [128, 96]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [128, 16]}]},
    "embed": {"inputs": [{"name": "text", "dtype": None, "shape": None}],
              "outputs": [{"name": "embedding", "dtype": "float32", "shape": [384]}]},
}


class ScriptedWorker:
    """Tells the broker what a worker would: its servable, methods, readiness and signatures, every 0.2 s."""

    def __init__(self, broker: str) -> None:
        self.status = {"servable": "fake", "version": 1, "methods": ["embed", "predict"], "ready": False,
                       "reason": "waiting for agents: 0/2 registered", "signatures": SIGNATURES}
        self.context = zmq.Context()
        self.socket = new_socket(self.context, zmq.DEALER)
        self.socket.connect(broker)
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.running.set()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while self.running.is_set():
            with self.lock:
                status = msgspec.convert(self.status, WorkerStatus)
                self.socket.send_multipart([BrokerCommand.CONTROL, encode(status)])
            time.sleep(0.2)

    def set(self, **status: object) -> None:
        with self.lock:
            self.status.update(status)

    def disconnect(self) -> None:
        self.running.clear()
        self.thread.join()
        self.socket.send_multipart([BrokerCommand.CONTROL, encode(WorkerDisconnect())])

    def close(self) -> None:
        self.running.clear()
        self.thread.join()
        self.socket.close(linger=100)
        self.context.term()


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path, None, "fake", None, extra_broker_args=["--max-request-mb", "1"])
    yield cluster
    codes = cluster.stop()
    assert set(codes.values()) == {0}, codes


def eventually(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.05)


def test_readiness_metadata_and_the_brokers_errors(broker: LocalCluster) -> None:
    url = broker.start_gateway("gateway")
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and not client.is_server_ready()  # no servable at all
    worker = ScriptedWorker(broker.worker_address)
    try:
        eventually(lambda: curl(url, "/v2/models/fake", b"", "GET")[0] == 200, "registered")
        assert not client.is_server_ready() and not client.is_model_ready("fake")
        assert curl(url, "/v2/models/fake/ready", b"", "GET") == (
            400, {"error": "servable 'fake' is not ready: waiting for agents: 0/2 registered"})
        assert client.get_model_metadata("fake", query_params={"method": "predict"}) == {
            "name": "fake", "versions": ["1"], "platform": "zmserve",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [128, 96]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [128, 16]}],
            "parameters": {"method": "predict", "methods": ["embed", "predict"]}}
        embed = client.get_model_metadata("fake")  # the first method
        assert embed["inputs"] == [{"name": "text"}] and embed["outputs"][0]["shape"] == [384]

        not_ready = "servable 'fake' is not ready: version 1: waiting for agents: 0/2 registered"
        assert curl(url, "/model/fake:predict", b'{"instances": [{"x": 1}]}') == (503, {"error_msg": not_ready})
        tensor = triton.InferInput("x", [1], "FP32")
        tensor.set_data_from_numpy(np.ones(1, np.float32))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("fake", [tensor], parameters={"method": "predict"})
        assert caught.value.status() == "503" and caught.value.message() == not_ready
        big = json.dumps({"instances": [{"x": "a" * (2 << 20)}]}).encode()
        status, answer = curl(url, "/model/fake:predict", big)
        assert status == 429 and "this broker takes at most 1048576" in answer["error_msg"]

        worker.set(ready=True, reason="")
        eventually(client.is_server_ready, "ready")
        assert client.is_model_ready("fake") and client.is_model_ready("fake", "1")
        worker.disconnect()
        eventually(lambda: curl(url, "/v2/models/fake", b"", "GET")[0] == 503, "lost")
        assert curl(url, "/v2/models/fake", b"", "GET") == (
            503, {"error": "servable 'fake' has no worker right now; retry"})
        status, answer = curl(url, "/model/fake:predict", b'{"instances": [{"x": 1}]}')
        assert status == 503 and "has no worker right now" in answer["error_msg"]
    finally:
        worker.close()


def test_without_a_broker_requests_end_at_their_deadline(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, None, "none", None)
    try:
        nowhere = f"tcp://127.0.0.1:{free_port()}"  # a port nobody listens on (the last --broker counts)
        url = cluster.start_gateway("gateway", "--broker", nowhere, "--timeout", "0.3")
        started = time.monotonic()
        status, answer = curl(url, "/model/any:predict", b'{"instances": [{"x": 1}]}')
        assert time.monotonic() - started < 5
        assert (status, answer) == (504, {"error_msg": f"no reply from the broker at {nowhere} within 0.3 s"})
        assert curl(url, "/v2/health/ready", b"", "GET")[0] == 504
        assert curl(url, "/v2/health/live", b"", "GET") == (200, None)
    finally:
        codes = cluster.stop()
    assert codes["gateway"] == 0, codes
