"""`zmserve gateway --grpc-bind` in front of a real cluster (broker, worker, one MindSpore agent serving the
`conform` servable): MindSpore Serving's `MSService/Predict` through a client generated from the same proto
(ms_grpc_client, which puts values on the wire as MindSpore Serving's client does), the whole request set of
ms_grpc_cases, deadlines, cancellation, and the Open Inference Protocol over gRPC with `tritonclient.grpc`."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.cluster import export_matmul, matmul_reference, write_servable
from tests.services.gateway.ms_grpc_cases import CASES, SERVABLE, Case, describe, same
from tests.services.gateway.ms_grpc_client import MsClient, parse, request
from tests.services.gateway.ms_rest_cases import ZMSERVE_CONFIG
from zmserve.local import LocalCluster
from zmserve.transport import free_port

pytestmark = pytest.mark.slow

RNG = np.random.default_rng(22)


class Served:
    def __init__(self, cluster: LocalCluster, grpc_address: str) -> None:
        self.cluster = cluster
        self.grpc_address = grpc_address
        self.client = MsClient(grpc_address)
        self.triton = triton.InferenceServerClient(grpc_address)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("grpc_gateway")
    model_files = export_matmul(workdir, 1)
    servables = write_servable(workdir / "servables", SERVABLE, ZMSERVE_CONFIG)
    cluster = LocalCluster(workdir, servables, SERVABLE, model_files)
    served = None
    try:
        cluster.wait_ready({"x": np.ones((128, 96), np.float32)})
        grpc_address = f"127.0.0.1:{free_port()}"
        cluster.start_gateway("gateway", "--grpc-bind", grpc_address)  # HTTP answers once gRPC listens
        served = Served(cluster, grpc_address)
        yield served
    finally:
        if served is not None:
            served.client.close()
            served.triton.close()
        codes = cluster.stop()
    assert codes["gateway"] == 0, codes


# ---- MindSpore Serving's Predict --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_mindspore_serving_requests(served: Served, case: Case) -> None:
    answer = served.client.infer(case.servable, case.method, case.instances, case.version)
    assert same(answer, case.answer), f"{describe(answer)}\n!=\n{describe(case.answer)}"


def test_matmul_of_random_inputs_matches_numpy(served: Served) -> None:
    xs = [RNG.standard_normal((128, 96)).astype(np.float32) for _ in range(3)]
    answer = served.client.infer(SERVABLE, "predict", [{"x": x} for x in xs])
    for x, outputs in zip(xs, answer, strict=True):
        np.testing.assert_allclose(outputs["y"], matmul_reference(x), rtol=1e-5, atol=1e-4)


def test_errors_carry_zmserve_code_in_trailing_metadata(served: Served) -> None:
    reply, call = served.client.stub.Predict.with_call(request("nope", "echo", 0, {"x": 1}))
    assert reply.error_msg[0].error_code != 0
    assert ("zmserve-code", "NOT_FOUND") in tuple(call.trailing_metadata())
    reply, call = served.client.stub.Predict.with_call(request(SERVABLE, "echo", 0, {"z": 1}))
    assert reply.error_msg[0].error_code == 2  # MindSpore Serving's INVALID_INPUTS
    assert ("zmserve-code", "INVALID_ARGUMENT") in tuple(call.trailing_metadata())


def test_a_bad_tensor_is_refused_with_mindspore_servings_words(served: Served) -> None:
    from zmserve.proto import ms_service_pb2 as pb

    message = pb.PredictRequest(servable_spec=pb.ServableSpec(name=SERVABLE, method_name="echo"))
    tensor = message.instances.add().items["x"]
    tensor.dtype = pb.MS_FLOAT32
    tensor.shape.dims.extend([2, 2])
    tensor.data = b"\0" * 12
    answer = served.client.stub.Predict(message)
    assert answer.error_msg[0].error_msg.decode() == \
        "Instances input x check failed, detail: Tensor check failed: input data size 12 invalid"


def test_the_calls_deadline_is_the_requests(served: Served) -> None:
    """A 16 MiB echo with a 1 ms gRPC deadline cannot be answered in time: the call ends DEADLINE_EXCEEDED."""
    big = np.ones(4 * 2**20, np.float32)
    with pytest.raises(grpc.RpcError) as caught:
        served.client.infer(SERVABLE, "echo", {"x": big}, timeout=0.001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_16_mib_tensor_round_trips(served: Served) -> None:
    big = RNG.standard_normal(4 * 2**20).astype(np.float32)
    answer = served.client.infer(SERVABLE, "echo", {"x": big})
    np.testing.assert_array_equal(answer[0]["y"], big)


def test_infer_async_style_futures_all_answered(served: Served) -> None:
    """MindSpore Serving's `infer_async` is `stub.Predict.future`: many in flight at once, each answered."""
    futures = [served.client.stub.Predict.future(request(SERVABLE, "echo", 0, {"x": i})) for i in range(20)]
    for i, future in enumerate(futures):
        assert same(parse(future.result(timeout=30)), [{"y": np.array([i], np.int64)}])


def test_mindspore_servings_own_client(served: Served) -> None:
    """MindSpore Serving 2.0.2's `Client` itself (the peer's Python 3.9), where the peer is installed: every case
    through `infer`, the first through `infer_async` too, each the answer the generated client gets."""
    from benchmarks.peers.mindspore_serving.grpc_peer import CASES_DIR, DEFAULT_PEER, REPO, installed, run_driver

    peer = (REPO / DEFAULT_PEER).resolve()
    if not installed(peer):
        peer = REPO.parent.parent / "shared" / "peers" / "mindspore-serving"  # a worktree beside the main checkout
    if not installed(peer):
        pytest.skip("MindSpore Serving's client is not installed (../shared/peers/mindspore-serving/setup.sh)")
    answers = dict(run_driver(peer, "cases", served.grpc_address, str(CASES_DIR)))
    expected = {case.name: case.answer for case in CASES}
    expected[f"{CASES[0].name}[infer_async]"] = CASES[0].answer
    assert answers.keys() == expected.keys()
    wrong = [f"{name}: {describe(answers[name])} != {describe(answer)}" for name, answer in expected.items()
             if not same(answers[name], answer)]
    assert not wrong, "\n".join(wrong)


# ---- the Open Inference Protocol over gRPC -----------------------------------------------------------------------
def test_tritonclient_health_and_metadata(served: Served) -> None:
    client = served.triton
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(SERVABLE)
    assert client.is_model_ready(SERVABLE, "1")
    assert client.get_server_metadata().name == "zmserve"
    metadata = client.get_model_metadata(SERVABLE)
    assert metadata.name == SERVABLE and list(metadata.versions) == ["1"] and metadata.platform == "zmserve"
    assert [i.name for i in metadata.inputs] == ["x"]
    with pytest.raises(InferenceServerException) as caught:
        client.is_model_ready("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "typed_contents"])
def test_tritonclient_infer_matches_numpy(served: Served, raw: bool) -> None:
    x = RNG.standard_normal((128, 96)).astype(np.float32)
    tensor = triton.InferInput("x", [128, 96], "FP32")
    if raw:
        tensor.set_data_from_numpy(x)
    else:
        tensor._get_tensor().contents.fp32_contents.extend(x.reshape(-1).tolist())
    result = served.triton.infer(SERVABLE, [tensor], parameters={"method": "predict"})
    np.testing.assert_allclose(result.as_numpy("y"), matmul_reference(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["INT8", "UINT16", "INT32", "INT64", "UINT64", "FP16", "FP64", "BOOL"])
def test_tritonclient_every_datatype_echoes(served: Served, dtype: str) -> None:
    from tritonclient.utils import triton_to_np_dtype

    x = (np.arange(6) % 3).astype(triton_to_np_dtype(dtype)).reshape(2, 3)
    tensor = triton.InferInput("x", [2, 3], dtype)
    tensor.set_data_from_numpy(x)
    result = served.triton.infer(SERVABLE, [tensor], parameters={"method": "echo"})
    y = result.as_numpy("y")
    assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(y, x)


def test_tritonclient_bytes_and_typed_ints(served: Served) -> None:
    tensor = triton.InferInput("x", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"abc"], np.object_))
    result = served.triton.infer(SERVABLE, [tensor], parameters={"method": "type_of"})
    assert result.as_numpy("y").tolist() == [b"bytes b'abc'"]
    ints = triton.InferInput("x", [3], "INT32")
    ints._get_tensor().contents.int_contents.extend([1, 2, 3])
    result = served.triton.infer(SERVABLE, [ints], parameters={"method": "echo"}, model_version="1")
    assert result.as_numpy("y").tolist() == [1, 2, 3] and result.get_response().model_version == "1"


def test_tritonclient_errors_carry_their_status(served: Served) -> None:
    x = triton.InferInput("x", [2], "FP32")
    x.set_data_from_numpy(np.ones(2, np.float32))
    for model, parameters, status in [("nope", {}, "NOT_FOUND"), (SERVABLE, {"method": "predict"}, "INVALID_ARGUMENT"),
                                      (SERVABLE, {"method": "fail"}, "INTERNAL")]:
        with pytest.raises(InferenceServerException) as caught:
            served.triton.infer(model, [x], parameters=parameters)
        assert caught.value.status() == f"StatusCode.{status}", caught.value
