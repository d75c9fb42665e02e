"""`zmserve gateway` in front of a real MatMul cluster (broker, worker, one MindSpore agent): curl speaking
MindSpore Serving's REST scheme, tritonclient speaking the Open Inference Protocol, results against numpy, and the
HTTP side: statuses, body limit, a stalled body, keep-alive, two gateways on one broker."""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.cluster import Exports, matmul_reference, wait_for, write_servable
from tests.services.gateway.gateway_client import curl, raw_request, read_response
from tests.services.gateway.ms_rest_cases import CASES, SERVABLE, ZMSERVE_CONFIG, Case
from zmserve.local import LocalCluster

pytestmark = pytest.mark.slow

RNG = np.random.default_rng(10)


class Gateways:
    def __init__(self, cluster: LocalCluster, url: str, strict_url: str) -> None:
        self.cluster = cluster
        self.url = url
        self.strict_url = strict_url
        """A second gateway on the same broker: 1 MiB bodies, 1 s to send one."""

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://")


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> Iterator[Gateways]:
    workdir = tmp_path_factory.mktemp("gateway_matmul")
    model_files = exports.matmul(1)
    servables = write_servable(workdir / "servables", SERVABLE, ZMSERVE_CONFIG)
    cluster = LocalCluster(workdir, servables, SERVABLE, model_files)
    try:
        cluster.wait_ready({"x": np.ones((128, 96), np.float32)})
        url = cluster.start_gateway("gateway")
        strict_url = cluster.start_gateway("gateway_strict", "--max-body-mb", "1", "--body-timeout", "1")
        yield Gateways(cluster, url, strict_url)
    finally:
        codes = cluster.stop()
    assert codes["gateway"] == 0 and codes["gateway_strict"] == 0, codes


# ---- MindSpore Serving's scheme, with curl ---------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_mindspore_serving_requests(gateways: Gateways, case: Case) -> None:
    assert curl(gateways.url, case.path, case.body, case.http_method) == (case.status, case.answer)


def test_matmul_from_a_json_list_and_from_b64_matches_numpy(gateways: Gateways) -> None:
    x = RNG.standard_normal((128, 96)).astype(np.float32)
    as_list = json.dumps({"instances": [{"x": x.tolist()}]}).encode()
    as_b64 = json.dumps({"instances": [{"x": {"b64": base64.b64encode(x.tobytes()).decode(), "type": "fp32",
                                              "shape": [128, 96]}}]}).encode()
    for body in (as_list, as_b64):
        status, answer = curl(gateways.url, f"/model/{SERVABLE}/version/1:predict", body)
        assert status == 200
        y = np.array(answer["instances"][0]["y"], np.float64)
        np.testing.assert_allclose(y, matmul_reference(x), rtol=1e-5, atol=1e-4)


def test_several_instances_are_each_answered(gateways: Gateways) -> None:
    xs = [RNG.standard_normal((128, 96)).astype(np.float32) for _ in range(3)]
    status, answer = curl(gateways.url, f"/model/{SERVABLE}:predict",
                          json.dumps({"instances": [{"x": x.tolist()} for x in xs]}).encode())
    assert status == 200 and len(answer["instances"]) == 3
    for x, instance in zip(xs, answer["instances"], strict=True):
        np.testing.assert_allclose(np.array(instance["y"]), matmul_reference(x), rtol=1e-5, atol=1e-4)


# ---- the Open Inference Protocol, with tritonclient ------------------------------------------------------------
def test_tritonclient_health_and_metadata(gateways: Gateways) -> None:
    client = triton.InferenceServerClient(gateways.host_port)
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata() == {"name": "zmserve", "version": "0.1.0",
                                            "extensions": ["binary_tensor_data"]}
    assert client.is_model_ready(SERVABLE) and client.is_model_ready(SERVABLE, "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready(SERVABLE, "2")
    metadata = client.get_model_metadata(SERVABLE)
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == (SERVABLE, ["1"], "zmserve")
    # the servable's methods in declaration order; the first is the default
    assert metadata["parameters"] == {"method": "predict", "methods": ["predict", "echo", "type_of", "swap", "fail"]}
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [128, 96]}]
    assert metadata["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [128, 16]}]
    chosen = client.get_model_metadata(SERVABLE, "1", query_params={"method": "echo"})
    assert chosen["parameters"]["method"] == "echo"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infer_matches_numpy(gateways: Gateways, binary: bool) -> None:
    client = triton.InferenceServerClient(gateways.host_port)
    x = RNG.standard_normal((128, 96)).astype(np.float32)
    tensor = triton.InferInput("x", [128, 96], "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [triton.InferRequestedOutput("y", binary_data=binary)]
    by_parameter = client.infer(SERVABLE, [tensor], outputs=wanted, parameters={"method": "predict"})
    by_query = client.infer(SERVABLE, [tensor], model_version="1", outputs=wanted, query_params={"method": "predict"})
    by_default = client.infer(SERVABLE, [tensor], outputs=wanted)  # no method named: the first declared, predict
    for result in (by_parameter, by_query, by_default):
        y = result.as_numpy("y")
        assert y.dtype == np.float32 and y.shape == (128, 16)
        np.testing.assert_allclose(y, matmul_reference(x), rtol=1e-5, atol=1e-4)
    assert by_query.get_response()["model_version"] == "1"


def test_tritonclient_strings(gateways: Gateways) -> None:
    client = triton.InferenceServerClient(gateways.host_port)
    for binary in (False, True):
        text = triton.InferInput("x", [1], "BYTES")
        text.set_data_from_numpy(np.array(["Grüße"], dtype=object), binary_data=binary)
        echoed = client.infer(SERVABLE, [text], parameters={"method": "echo"})
        assert echoed.as_numpy("y").tolist() == ["Grüße".encode()]
        described = client.infer(SERVABLE, [text], parameters={"method": "type_of"}).as_numpy("y")
        assert described.tolist() == [("str 'Grüße'" if not binary else "bytes b'Gr\\xc3\\xbc\\xc3\\x9fe'").encode()]


def test_tritonclient_errors_carry_their_status(gateways: Gateways) -> None:
    client = triton.InferenceServerClient(gateways.host_port)
    tensor = triton.InferInput("x", [2], "INT32")
    tensor.set_data_from_numpy(np.array([1, 2], np.int32))
    cases = [("nope", {}, 0, 404, "'nope' is not served"),
             (SERVABLE, {"method": "nope"}, 0, 404, "no method 'nope'"),
             (SERVABLE, {"method": "predict"}, 0, 400, "must be float32"),
             (SERVABLE, {"method": "fail"}, 0, 500, "this stage always fails"),
             (SERVABLE, {"method": "predict"}, 1, 504, "deadline")]
    for model, parameters, timeout_us, status, message in cases:
        with pytest.raises(InferenceServerException) as caught:
            client.infer(model, [tensor], parameters=parameters, timeout=timeout_us or None)
        assert caught.value.status() == str(status) and message in caught.value.message(), caught.value


# ---- HTTP: keep-alive, limits, slow bodies, several gateways ---------------------------------------------------
def test_keep_alive_serves_many_requests_on_one_connection(gateways: Gateways) -> None:
    path = f"/model/{SERVABLE}:echo"
    done = subprocess.run(["curl", "-sv", "-X", "POST", "-d", '{"instances": [{"x": 1}]}', gateways.url + path,
                           "-d", "", gateways.url + path], capture_output=True, text=True, timeout=60, check=True)
    assert "Re-using existing connection" in done.stderr, done.stderr
    host, port = gateways.host_port.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", path, body=b'{"instances": [{"x": 1}]}')
    first_socket = connection.sock
    assert json.loads(connection.getresponse().read()) == {"instances": [{"y": 1}]}
    for value in range(20):
        connection.request("POST", path, body=json.dumps({"instances": [{"x": value}]}).encode())
        assert json.loads(connection.getresponse().read()) == {"instances": [{"y": value}]}
        assert connection.sock is first_socket
    connection.close()


def test_a_body_over_the_limit_is_413_and_closes_the_connection(gateways: Gateways) -> None:
    host, port = gateways.strict_url.removeprefix("http://").split(":")
    body = b'{"instances": [{"x": "' + b"a" * (2 << 20) + b'"}]}'
    status, headers, answer = read_response(raw_request(host, int(port), (
        f"POST /model/{SERVABLE}:echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n").encode(), body))
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(answer) == {"error_msg": f"the body has {len(body)} bytes; this gateway takes at most 1048576"}
    chunked = raw_request(host, int(port), (f"POST /v2/models/{SERVABLE}/infer HTTP/1.1\r\nHost: x\r\n"
                                            "Transfer-Encoding: chunked\r\n\r\n").encode(),
                          b"".join(b"10000\r\n" + b" " * 0x10000 + b"\r\n" for _ in range(20)))
    status, _, answer = read_response(chunked)
    assert status == 413 and json.loads(answer) == {"error": "the body is larger than this gateway's 1048576 bytes"}


def test_a_stalled_body_blocks_nobody_and_gets_408(gateways: Gateways) -> None:
    host, port = gateways.strict_url.removeprefix("http://").split(":")
    stalled = raw_request(host, int(port), (f"POST /model/{SERVABLE}:echo HTTP/1.1\r\nHost: x\r\n"
                                            "Content-Length: 1000\r\n\r\n").encode(), b'{"instances": [')
    started = time.monotonic()
    answered = [curl(gateways.strict_url, f"/model/{SERVABLE}:echo", b'{"instances": [{"x": 5}]}')
                for _ in range(5)]
    assert answered == [(200, {"instances": [{"y": 5}]})] * 5
    assert time.monotonic() - started < 1.0  # all answered while the stalled body still waits
    status, headers, answer = read_response(stalled)
    assert status == 408 and headers["connection"] == "close" and 0.9 < time.monotonic() - started < 5
    assert json.loads(answer) == {"error_msg": "the request body was not complete within 1 s"}
    assert stalled.recv(1) == b""  # and the connection is closed


def test_two_gateways_on_one_broker_both_serve(gateways: Gateways) -> None:
    x = RNG.standard_normal((128, 96)).astype(np.float32)
    body = json.dumps({"instances": [{"x": x.tolist()}]}).encode()
    answers = [curl(url, f"/model/{SERVABLE}:predict", body) for url in (gateways.url, gateways.strict_url)]
    assert [status for status, _ in answers] == [200, 200]
    assert answers[0][1] == answers[1][1]


def test_unknown_paths_and_methods(gateways: Gateways) -> None:
    assert curl(gateways.url, "/nowhere", b"", "GET")[0] == 404
    assert curl(gateways.url, "/v2/health/live", b"", "POST") == (405, {"error": "POST is not allowed here; use GET"})
    assert curl(gateways.url, f"/v2/models/{SERVABLE}/infer", b"", "GET")[0] == 405
    assert curl(gateways.url, f"/v2/models/{SERVABLE}/versions/x", b"", "GET")[0] == 400


def test_the_gateway_logs_failures_with_their_code(gateways: Gateways) -> None:
    curl(gateways.url, "/model/absent:predict", b'{"instances": [{"x": 1}]}')
    log_path: Path = gateways.cluster.logs["gateway"]
    wait_for(lambda: any(json.loads(line).get("path") == "/model/absent:predict"
                         for line in log_path.read_text().splitlines() if line.startswith("{")),
             timeout=5, what="the request_failed log line")
    line = next(json.loads(line) for line in log_path.read_text().splitlines()
                if line.startswith("{") and json.loads(line).get("path") == "/model/absent:predict")
    assert (line["event"], line["status"], line["code"], line["component"]) == \
        ("request_failed", 404, "NOT_FOUND", "gateway")


def test_garbage_is_answered_400_and_logged(gateways: Gateways) -> None:
    host, port = gateways.host_port.split(":")
    sock = raw_request(host, int(port), b"NOT HTTP AT ALL\r\n\r\n")
    status, _, _ = read_response(sock)
    assert status == 400
    log_path: Path = gateways.cluster.logs["gateway"]
    wait_for(lambda: any(json.loads(line).get("event") == "http_server" for line in
                         log_path.read_text().splitlines() if line.startswith("{")),
             timeout=5, what="uvicorn's complaint as a structlog line")
