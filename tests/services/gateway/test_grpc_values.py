"""MindSpore Serving's gRPC tensors to zmserve values and back (services/gateway/ms_grpc.py), and the reply's
error layout, without a server: what a client puts on the wire and what MindSpore Serving says when it is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from tests.services.gateway.ms_grpc_cases import DTYPES, arange, same
from tests.services.gateway.ms_grpc_client import parse, put
from zmserve.proto import ms_service_pb2 as pb
from zmserve.protocol import ErrorCode, ServingError
from zmserve_services.gateway.ms_grpc import input_value, output_tensor, reply


def tensor_of(value) -> pb.Tensor:
    tensor = pb.Tensor()
    put(value, tensor)
    return tensor


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips(dtype: str) -> None:
    x = arange(dtype)
    value = input_value("x", tensor_of(x))
    assert same(value, x)
    back = pb.Tensor()
    output_tensor(value, back)
    assert back == tensor_of(x)


@pytest.mark.parametrize(("value", "expected"), [
    ("héllo", "héllo"), (b"\x00\xff", b"\x00\xff"), (np.float32(2.5), np.array(2.5, np.float32)),
    (3, np.array([3], np.int64)), (True, np.array([True])), (0.5, np.array([0.5], np.float64)),
])
def test_scalars_str_and_bytes_arrive_as_the_client_sent_them(value, expected) -> None:
    """A Python number is a one-element array of numpy's default dtype (the client's np.array((v,))); a numpy
    scalar keeps its dtype and shape ()."""
    assert same(input_value("x", tensor_of(value)), expected)


def bad(dtype: int, dims: list[int], data: bytes = b"", bytes_val: tuple[bytes, ...] = ()) -> pb.Tensor:
    tensor = pb.Tensor(dtype=dtype, bytes_val=list(bytes_val))
    tensor.shape.dims.extend(dims)
    if data:
        tensor.data = data
    return tensor


@pytest.mark.parametrize(("tensor", "detail"), [
    (bad(pb.MS_FLOAT32, [2, 2], b"\0" * 12), "Tensor check failed: input data size 12 invalid"),
    (bad(pb.MS_FLOAT32, [-1, 2]), "Tensor check failed: input  shape [-1, 2] invalid"),
    (bad(pb.MS_FLOAT32, [0, 2]), "Tensor check failed: input  shape [0, 2] invalid"),
    (bad(pb.MS_UNKNOWN, [1], b"\0"), "Tensor check failed: input data type 0 invalid"),
    (bad(pb.MS_BYTES, [2], bytes_val=(b"a", b"b")),
     "Instance tensor check failed: bytes or string type shape batch size can only be 1"),
    (bad(pb.MS_STRING, [1, 1], bytes_val=(b"a",)),
     "Instance tensor check failed: bytes or string type input  shape can only be (1,) or empty, but given shape "
     "is [1, 1]"),
])
def test_bad_tensors_are_refused_with_mindspore_servings_words(tensor: pb.Tensor, detail: str) -> None:
    with pytest.raises(ServingError) as caught:
        input_value("x", tensor)
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT
    assert caught.value.message == f"Instances input x check failed, detail: {detail}"


def test_a_zero_dimension_last_is_an_empty_tensor() -> None:
    assert input_value("x", bad(pb.MS_FLOAT32, [2, 0])).shape == (2, 0)


SPEC = pb.ServableSpec(name="s", method_name="m")
OK = {"y": np.ones(2, np.float32)}
BAD = ServingError(ErrorCode.INVALID_ARGUMENT, "instance 0: no")


def test_reply_layouts_are_mindspore_servings() -> None:
    both_ok = reply(SPEC, [OK, OK])
    assert len(both_ok.instances) == 2 and not both_ok.error_msg
    one_failed = reply(SPEC, [BAD, OK])
    assert [e.error_code for e in one_failed.error_msg] == [2, 0] and len(one_failed.instances) == 2
    assert not one_failed.instances[0].items
    assert same(parse(one_failed), [{"error": "instance 0: no"}, OK])
    same_failure = reply(SPEC, [BAD, BAD])
    assert len(same_failure.error_msg) == 1 and not same_failure.instances
    assert parse(same_failure) == {"error": "instance 0: no"}
    other = ServingError(ErrorCode.INTERNAL, "instance 0: boom")
    assert parse(reply(SPEC, [BAD, other])) == [{"error": "instance 0: no"}, {"error": "instance 0: boom"}]
    assert reply(SPEC, [other]).error_msg[0].error_code == 3
