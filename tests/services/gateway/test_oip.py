"""The Open Inference Protocol mapping, no processes: infer requests (JSON and binary-data extension), responses,
and model metadata from what the broker reports."""

from __future__ import annotations

import struct

import msgspec
import numpy as np
import orjson
import pytest

from zmserve.protocol import ErrorCode, ServingError
from zmserve_services.gateway import oip
from zmserve_services.gateway.broker_link import MethodSignature, ServableVersion, Served, TensorSpec

X = np.arange(12, dtype=np.float32).reshape(3, 4)


def binary_request(document: dict, *chunks: bytes) -> tuple[bytes, str]:
    head = orjson.dumps(document)
    return head + b"".join(chunks), str(len(head))


def test_json_infer_request() -> None:
    body = orjson.dumps({"id": "r1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 4],
                                                 "data": X.reshape(-1).tolist()}],
                         "outputs": [{"name": "y"}], "parameters": {"method": "predict", "timeout": 2_500_000}})
    request = oip.parse_infer(body, None)
    np.testing.assert_array_equal(request.inputs["x"], X)
    assert (request.id, request.method, request.timeout, request.outputs) == ("r1", "predict", 2.5, [("y", False)])


def test_binary_infer_request_takes_each_inputs_bytes_in_order() -> None:
    text = struct.pack("<I", 5) + b"hello"
    body, length = binary_request(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 4], "parameters": {"binary_data_size": 48}},
                    {"name": "t", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}},
                    {"name": "n", "datatype": "INT32", "shape": [], "data": [7]}],
         "parameters": {"binary_data_output": True}}, X.tobytes(), text)
    request = oip.parse_infer(body, length)
    np.testing.assert_array_equal(request.inputs["x"], X)
    assert request.inputs["t"] == b"hello" and request.inputs["n"].item() == 7
    assert request.binary_outputs and request.outputs is None


@pytest.mark.parametrize(("body", "length", "message"), [
    (b"{", None, "not valid JSON"),
    (b'{"inputs": []}', None, "non-empty 'inputs' list"),
    (b'{"inputs": [{"datatype": "FP32"}]}', None, "each input is an object with a 'name'"),
    (b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}, '
     b'{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}]}', None, "input 'x' is given twice"),
    (b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}]}', "99", "the body has"),
    (b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}], "parameters": {"timeout": -1}}',
     None, "parameter 'timeout' is in microseconds"),
    (b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}], "parameters": {"method": 1}}',
     None, "parameter 'method' must be a string"),
])
def test_bad_infer_requests(body: bytes, length: str | None, message: str) -> None:
    with pytest.raises(ServingError) as caught:
        oip.parse_infer(body, length)
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT and message in caught.value.message


def test_binary_sizes_must_add_up() -> None:
    tensor = {"name": "x", "datatype": "INT8", "shape": [2], "parameters": {"binary_data_size": 2}}
    with pytest.raises(ServingError, match="add up to 2 bytes, 3 follow"):
        oip.parse_infer(*binary_request({"inputs": [tensor]}, b"abc"))
    with pytest.raises(ServingError, match="does not fit the 1 binary bytes"):
        oip.parse_infer(*binary_request({"inputs": [tensor]}, b"a"))


def request(outputs: list[tuple[str, bool]] | None = None, binary: bool = False) -> oip.InferRequest:
    return oip.InferRequest("id7", None, None, {}, outputs, binary)


def test_json_response() -> None:
    body, length = oip.infer_response("m", 0, request(), {"y": X, "label": "cat"})
    assert length is None
    assert orjson.loads(body) == {"model_name": "m", "id": "id7", "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [3, 4], "data": X.reshape(-1).tolist()},
        {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["cat"]}]}


def test_binary_response_as_tritonclient_reads_it() -> None:
    body, length = oip.infer_response("m", 2, request([("y", True), ("label", False)]), {"y": X, "label": b"\xff"})
    document = orjson.loads(body[:length])
    assert document["model_version"] == "2"
    y, label = document["outputs"]
    assert y["parameters"] == {"binary_data_size": 48} and "data" not in y
    np.testing.assert_array_equal(np.frombuffer(body[length:length + 48], np.float32).reshape(3, 4), X)
    assert label["parameters"] == {"binary_data_size": 5}  # not UTF-8: binary although JSON was asked for
    assert body[length + 48:] == struct.pack("<I", 1) + b"\xff"


def test_unknown_requested_output_is_invalid() -> None:
    with pytest.raises(ServingError, match="output 'z' was requested"):
        oip.infer_response("m", 0, request([("z", False)]), {"y": X})


SERVED = Served((
    ServableVersion("mm", 1, ("predict",), ready=True),
    ServableVersion("mm", 2, ("embed", "predict"), ready=False, reason="waiting for agents", signatures={
        "predict": MethodSignature((TensorSpec("x", "float32", (-1, 96)),),
                                   (TensorSpec("y", "float32", (-1, 16)),)),
        "embed": MethodSignature((TensorSpec("text"),), (TensorSpec("embedding", "float32", (384,)),))}),
), lost=("gone",))


def test_version_zero_is_the_newest_ready_version_as_the_broker_routes_it() -> None:
    assert oip.choose(SERVED, "mm", 0).version == 1  # version 2 is still waiting for agents
    not_ready = Served(tuple(msgspec.structs.replace(v, ready=False) for v in SERVED.versions))
    assert oip.choose(not_ready, "mm", 0).version == 2  # none ready: the newest, whose reason is the answer


def test_model_metadata_from_the_workers_signatures() -> None:
    assert orjson.loads(oip.model_metadata(SERVED, "mm", 2, "predict")) == {
        "name": "mm", "versions": ["1", "2"], "platform": "zmserve",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 96]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 16]}],
        "parameters": {"method": "predict", "methods": ["embed", "predict"]}}
    embed = orjson.loads(oip.model_metadata(SERVED, "mm", 2, None))
    assert embed["inputs"] == [{"name": "text"}] and embed["parameters"]["method"] == "embed"


def test_model_metadata_without_signatures_lists_no_tensors() -> None:
    document = orjson.loads(oip.model_metadata(SERVED, "mm", 1, None))
    assert (document["inputs"], document["outputs"], document["parameters"]["method"]) == ([], [], "predict")


@pytest.mark.parametrize(("name", "version", "method", "code"), [
    ("nope", 0, None, ErrorCode.NOT_FOUND),
    ("gone", 0, None, ErrorCode.UNAVAILABLE),
    ("mm", 3, None, ErrorCode.NOT_FOUND),
    ("mm", 1, "embed", ErrorCode.NOT_FOUND),
])
def test_model_metadata_errors(name: str, version: int, method: str | None, code: ErrorCode) -> None:
    with pytest.raises(ServingError) as caught:
        oip.model_metadata(SERVED, name, version, method)
    assert caught.value.code == code


def test_versions_in_urls() -> None:
    assert [oip.parse_version(v) for v in (None, "1", "12")] == [0, 1, 12]
    for bad in ("0", "x", "-1"):
        with pytest.raises(ServingError):
            oip.parse_version(bad)
