"""Values survive the wire exactly; malformed input is refused with INVALID_ARGUMENT."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from zmserve.codec import ALLOWED_DTYPES, decode_instances, decode_values, encode_instances, encode_values
from zmserve.protocol import ErrorCode, ModelCall, ServingError, TensorSpec, decode, encode


def round_trip(values: dict) -> dict:
    descriptors, frames = encode_values(values)
    return decode_values(descriptors, [memoryview(f).tobytes() if not isinstance(f, bytes) else f for f in frames])


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 4), (4, 5, 6)])
def test_every_dtype_and_shape_round_trips(dtype: str, shape: tuple) -> None:
    array = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    back = round_trip({"a": array})["a"]
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_non_contiguous_array_round_trips() -> None:
    array = np.arange(60, dtype=np.float32).reshape(6, 10)[::2, 1::3]
    assert not array.flags.c_contiguous
    np.testing.assert_array_equal(round_trip({"a": array})["a"], array)


def test_big_endian_is_converted_to_little_endian_with_same_values() -> None:
    array = np.arange(12, dtype=">f4").reshape(3, 4)
    back = round_trip({"a": array})["a"]
    assert back.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(back, array)


def test_strings_bytes_and_scalars() -> None:
    back = round_trip({"s": "héllo ☃", "b": b"\x00\xff", "i": 3, "f": 2.5, "t": True})
    assert back["s"] == "héllo ☃" and back["b"] == b"\x00\xff"
    assert back["i"].shape == () and int(back["i"]) == 3 and float(back["f"]) == 2.5 and bool(back["t"])


def test_several_instances_keep_their_order() -> None:
    instances = [{"x": np.full((2, 2), i, np.int32), "name": f"n{i}"} for i in range(4)]
    descriptors, frames = encode_instances(instances)
    back = decode_instances(descriptors, [bytes(memoryview(f)) for f in frames])
    for i, instance in enumerate(back):
        assert instance["name"] == f"n{i}" and (instance["x"] == i).all()


def test_large_tensor_is_received_without_copy_through_zmq() -> None:
    """Sent zero-copy, the receiver's array is a view on the received frame."""
    context = zmq.Context()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        receiver.bind("inproc://codec-test")
        sender.connect("inproc://codec-test")
        array = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
        descriptors, frames = encode_values({"big": array})
        sender.send_multipart([encode(ModelCall(call=1, values=descriptors)), *frames], copy=False)
        header_frame, *value_frames = receiver.recv_multipart(copy=False)
        back = decode_values(decode(header_frame, ModelCall).values, value_frames)["big"]
        assert not back.flags.owndata and back.base is not None
        np.testing.assert_array_equal(back, array)
    finally:
        sender.close(0)
        receiver.close(0)
        context.term()


@pytest.mark.parametrize(
    ("descriptors", "frames", "fragment"),
    [
        ([TensorSpec("a", "float32", [2])], [b"\x00" * 7], "needs 8 bytes"),
        ([TensorSpec("a", "float32", [2])], [], "0 value frames"),
        ([TensorSpec("a", "object", [])], [b""], "unsupported dtype"),
        ([TensorSpec("a", "int8", [-1])], [b""], "invalid shape"),
        ([TensorSpec("s", "str", [])], [b"\xff\xfe"], "not UTF-8"),
    ],
)
def test_malformed_values_are_invalid_argument(descriptors: list, frames: list, fragment: str) -> None:
    with pytest.raises(ServingError) as caught:
        decode_values(descriptors, frames)
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT
    assert fragment in caught.value.message


def test_object_arrays_are_refused_on_encode() -> None:
    with pytest.raises(ServingError) as caught:
        encode_values({"a": np.array([object()])})
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT
