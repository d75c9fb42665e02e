"""Value conversion, no processes: MindSpore Serving's JSON values and b64 objects with its dtype rules and
messages, its reply values, and OIP tensors (JSON and binary) both ways."""

from __future__ import annotations

import base64
import struct

import numpy as np
import orjson
import pytest

from zmserve.protocol import ErrorCode, ServingError
from zmserve_services.gateway.values import (
    ms_reply_value,
    ms_value,
    oip_binary_data,
    oip_datatype,
    oip_input,
    oip_json_data,
    oip_shape,
)


def refused(value: object) -> str:
    with pytest.raises(ServingError) as caught:
        ms_value(value)
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT
    return caught.value.message


def b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


# ---- MindSpore Serving: scalars and lists ----------------------------------------------------------------------
@pytest.mark.parametrize(("value", "dtype"), [(1, np.int32), (-7, np.int32), (1.5, np.float32), (True, np.bool_)])
def test_json_scalars_take_mindspore_servings_dtypes(value: object, dtype: type) -> None:
    converted = ms_value(value)
    assert isinstance(converted, np.ndarray) and converted.shape == () and converted.dtype == dtype
    assert converted.item() == value


def test_a_json_string_is_a_str_value() -> None:
    assert ms_value("héllo") == "héllo"


def test_ints_outside_int32_are_refused_not_wrapped() -> None:
    assert refused(2**31) == "json int 2147483648 is out of the int32 range"
    assert ms_value(-(2**31)).item() == -(2**31)
    assert "outside the int32 range" in refused([1, 2**31])


def test_a_float_too_large_for_float32_is_inf() -> None:
    assert np.isinf(ms_value(1e40))


def test_null_is_refused() -> None:
    assert refused(None) == "json value is null, it is not supported"


@pytest.mark.parametrize(("value", "dtype", "shape"), [
    ([1, 2, 3], np.int32, (3,)),
    ([[1.5, 2.0], [3.0, 4.0]], np.float32, (2, 2)),
    ([[[True], [False]]], np.bool_, (1, 2, 1)),
])
def test_lists_are_tensors_of_their_first_elements_kind(value: list, dtype: type, shape: tuple) -> None:
    converted = ms_value(value)
    assert converted.dtype == dtype and converted.shape == shape
    np.testing.assert_array_equal(converted, np.array(value))


@pytest.mark.parametrize(("value", "message"), [
    ([[1, 2], [3]], "invalid json array: json size is 1, the dim 1 expected to be 2"),
    ([[1, 2], 3], "invalid json array: json type is not array"),
    ([1, [2, 3]], "json array, data should be number, bool, string or bytes"),
    ([1, None], "json array, data should be number, bool, string or bytes"),
    ([1, 2.5], "json array, elements type is not equal"),
    ([True, 1], "json array, elements type is not equal"),
    ([1, "a"], "json array, elements type is not equal"),
    (["a", "b"], "json array, string or bytes type only support one item"),
    ([], "json array, shape is empty"),
    ([[]], "json array, data type is unknown"),
    ([None], "json array, data type is unknown"),
    ([{"b64": "AAAA", "type": "fp32"}], "json array, item is object type, object only support string or bytes type"),
    ([{"b64": "AAAA", "type": "nope"}], "json array, data type is unknown"),
])
def test_bad_lists_get_mindspore_servings_message(value: list, message: str) -> None:
    assert refused(value) == message


def test_ints_among_floats_are_accepted_as_numpy_promotes_them() -> None:
    converted = ms_value([[1.0, 2], [3, True]])
    assert converted.dtype == np.float32
    np.testing.assert_array_equal(converted, [[1, 2], [3, 1]])


def test_one_element_string_and_bytes_lists_are_scalars() -> None:
    assert ms_value(["abc"]) == "abc"
    assert ms_value([[{"b64": "YWJj"}]]) == b"abc"
    assert ms_value([{"b64": "YWJj", "type": "str"}]) == "abc"


# ---- MindSpore Serving: b64 objects ----------------------------------------------------------------------------
@pytest.mark.parametrize(("type_name", "dtype"), [
    ("int8", np.int8), ("int16", np.int16), ("int32", np.int32), ("int64", np.int64), ("uint8", np.uint8),
    ("uint16", np.uint16), ("uint32", np.uint32), ("uint64", np.uint64), ("fp16", np.float16),
    ("float16", np.float16), ("fp32", np.float32), ("float32", np.float32), ("fp64", np.float64),
    ("float64", np.float64), ("bool", np.bool_),
])
def test_b64_tensors_of_every_type(type_name: str, dtype: type) -> None:
    array = np.arange(6).astype(dtype).reshape(2, 3)
    converted = ms_value({"b64": b64(array), "type": type_name, "shape": [2, 3]})
    assert converted.dtype == dtype
    np.testing.assert_array_equal(converted, array)


def test_b64_defaults_to_bytes_and_str_is_decoded() -> None:
    assert ms_value({"b64": "YWJj"}) == b"abc"
    assert ms_value({"b64": base64.b64encode("Grüße".encode()).decode(), "type": "str"}) == "Grüße"


def test_b64_without_shape_is_a_scalar() -> None:
    converted = ms_value({"b64": b64(np.array(2.5, np.float64)), "type": "fp64"})
    assert converted.shape == () and converted.item() == 2.5


@pytest.mark.parametrize(("value", "message"), [
    ({}, "json object, value is empty"),
    ({"b64": "", "type": "fp32", "shape": [], "x": 1},
     "json object, items size is more than 3, only support specified ['b64', 'type', 'shape']"),
    ({"b64": "YWJj", "extra": 1}, "json object, key is not ['b64', 'type', 'shape'], fail key:extra"),
    ({"type": "str"}, "json object, 'b64' should be specified only one time"),
    ({"b64": "YWJj", "type": 3}, "json object, key is 'type', value should be string type"),
    ({"b64": "YWJj", "type": "complex"}, "json object, specified type:'complex' is illegal"),
    ({"b64": "YWJj", "shape": "2"}, "json object, key is 'shape', value should be array type"),
    ({"b64": "YWJj", "shape": [-1]}, "json object, key is 'shape', array value should be unsigned integer"),
    ({"b64": "YWJj", "shape": [1.0]}, "json object, key is 'shape', array value should be unsigned integer"),
    ({"b64": "", "type": "fp32", "shape": [0, 2]}, "json object, key is 'shape', invalid shape value [0,2]"),
    ({"b64": "YWJj", "type": "bytes", "shape": [2]},
     "json object, only support scalar when data type is string or bytes, please check 'type' or 'shape'"),
    ({"b64": 123}, "get scalar data failed, type is string, but json is not string type"),
    ({"b64": "AAA", "type": "int8", "shape": [2]}, "'AAA' is illegal b64 encode string"),
    ({"b64": "AAAAAAAAgD8=", "type": "fp32", "shape": [3]},
     "size is not matched, decode base64 size:8; Given info: type:float32; type size:4; element nums:3"),
])
def test_bad_b64_objects_get_mindspore_servings_message(value: dict, message: str) -> None:
    assert refused(value) == message


def test_b64_keys_are_checked_in_name_order_as_mindspore_serving_does() -> None:
    # both 'shape' and 'type' are wrong: the first complaint is about 'shape', the key that sorts first
    assert refused({"type": 3, "shape": "x", "b64": ""}) == "json object, key is 'shape', value should be array type"


# ---- MindSpore Serving: replies --------------------------------------------------------------------------------
def test_reply_floats_are_the_double_of_their_float32() -> None:
    text = orjson.dumps({"a": ms_reply_value(np.array([0.1], np.float32)), "b": ms_reply_value(np.float32(0.1)),
                         "c": ms_reply_value(np.array([1.5], np.float16))}, option=orjson.OPT_SERIALIZE_NUMPY)
    assert text == b'{"a":[0.10000000149011612],"b":0.10000000149011612,"c":[1.5]}'


def test_reply_values_of_every_kind() -> None:
    document = {"int": ms_reply_value(np.array([[1, 2]], np.int32)), "bool": ms_reply_value(np.array(True)),
                "str": ms_reply_value("é"), "bytes": ms_reply_value(b"\x00\xff"),
                "u64": ms_reply_value(np.array([2**63], np.uint64)), "empty": ms_reply_value(np.zeros((0,)))}
    assert orjson.loads(orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)) == {
        "int": [[1, 2]], "bool": True, "str": "é", "bytes": {"b64": "AP8="}, "u64": [2**63], "empty": []}


# ---- Open Inference Protocol -----------------------------------------------------------------------------------
def test_oip_json_data_flat_or_nested() -> None:
    flat = oip_input("x", "FP32", [2, 2], [1, 2, 3, 4.5])
    nested = oip_input("x", "FP32", [2, 2], [[1, 2], [3, 4.5]])
    assert flat.dtype == np.float32 and flat.shape == (2, 2)
    np.testing.assert_array_equal(flat, nested)
    assert oip_input("b", "BOOL", [2], [True, False]).dtype == np.bool_
    assert oip_input("s", "INT64", [], [7]).shape == ()


def test_oip_binary_tensor_is_read_in_place() -> None:
    array = np.arange(6, dtype=np.int16).reshape(3, 2)
    converted = oip_input("x", "INT16", [3, 2], raw=memoryview(array.tobytes()))
    np.testing.assert_array_equal(converted, array)


def test_oip_bytes_are_one_str_or_bytes_value() -> None:
    assert oip_input("t", "BYTES", [1], ["héllo"]) == "héllo"
    assert oip_input("t", "BYTES", [1, 1], [["x"]]) == "x"
    raw = struct.pack("<I", 3) + b"\x00\xffa"
    assert oip_input("t", "BYTES", [1], raw=memoryview(raw)) == b"\x00\xffa"


@pytest.mark.parametrize(("args", "message"), [
    (("x", "BF16", [1], [1.0]), "datatype 'BF16' is not one of"),
    (("x", "FP32", [-1], [1.0]), "shape must be a list of non-negative integers"),
    (("x", "FP32", [3], [1.0, 2.0]), "shape [3] holds 3 elements, data has 2"),
    (("x", "FP32", [1], ["a"]), "data is not FP32"),
    (("x", "FP32", [2], None), "has neither 'data' nor a 'binary_data_size' parameter"),
    (("t", "BYTES", [2], ["a", "b"]), "a BYTES input holds one element in zmserve"),
    (("t", "BYTES", [1], [5]), "BYTES data in JSON must be one string"),
])
def test_bad_oip_inputs_are_invalid_argument(args: tuple, message: str) -> None:
    with pytest.raises(ServingError) as caught:
        oip_input(*args)
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT and message in caught.value.message


def test_oip_binary_sizes_are_checked() -> None:
    with pytest.raises(ServingError, match="needs 16 bytes of binary data, got 12"):
        oip_input("x", "FP32", [4], raw=memoryview(bytes(12)))
    with pytest.raises(ServingError, match="BYTES element says 9 bytes, 2 follow"):
        oip_input("t", "BYTES", [1], raw=memoryview(struct.pack("<I", 9) + b"ab"))


def test_oip_outputs_both_ways() -> None:
    y = np.arange(6, dtype=np.float16).reshape(2, 3)
    assert (oip_datatype(y), oip_shape(y)) == ("FP16", [2, 3])
    assert orjson.dumps(oip_json_data(y), option=orjson.OPT_SERIALIZE_NUMPY) == b"[0.0,1.0,2.0,3.0,4.0,5.0]"
    np.testing.assert_array_equal(np.frombuffer(oip_binary_data(y), np.float16).reshape(2, 3), y)
    assert (oip_datatype("é"), oip_shape("é"), oip_json_data("é")) == ("BYTES", [1], ["é"])
    assert oip_binary_data("é") == struct.pack("<I", 2) + "é".encode()
    assert oip_json_data(b"\xff") is None  # not UTF-8: only the binary form can carry it
    assert (oip_datatype(np.array(3, np.int64)), oip_shape(np.array(3, np.int64))) == ("INT64", [])
