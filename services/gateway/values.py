"""Values between HTTP bodies and zmserve: JSON numbers, lists, base64 objects and OIP tensors in, numpy arrays,
str and bytes out, and back.

Two dialects, one module, because both end in the same zmserve values (`zmserve.codec.Value`):

- **MindSpore Serving's RESTful values** (`ms_value`, `ms_reply_value`), with its dtype rules: a JSON int is
  int32, a float float32, a bool bool; a nested list is a tensor whose shape is read from its first elements and
  whose dtype is its first element's; `{"b64": ..., "type": ..., "shape": [...]}` carries raw bytes (type
  `bytes`, the default, or `str`) or a raw tensor. Failures raise ServingError(INVALID_ARGUMENT) with MindSpore
  Serving's own message text, so a client that matches on it keeps working.
- **Open Inference Protocol tensors** (`oip_input`, `oip_output`): a datatype name, a shape and either JSON data
  (flat or nested, row-major) or raw bytes from the binary-data extension.

Speed matters here: a 128x96 JSON list is 12,288 Python floats. They become an array in one `np.array` call;
the element-by-element walk that reproduces MindSpore Serving's messages runs only once that call has failed.
Base64 is pybase64's SIMD decoder: 5 us for the 65 KB MatMul input against 230 us for the stdlib's.
"""

from __future__ import annotations

import binascii
import math
import struct
from typing import Any

import numpy as np
import orjson
import pybase64

from zmserve.codec import Value
from zmserve.protocol import ErrorCode, ServingError

# ---- MindSpore Serving -----------------------------------------------------------------------------------------
MS_TYPES: dict[str, str] = {
    "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
    "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "fp16": "float16", "fp32": "float32", "fp64": "float64",
    "float16": "float16", "float32": "float32", "float64": "float64",
    "bool": "bool", "str": "str", "bytes": "bytes",
}
"""The `type` names of a b64 object and what each becomes (numpy dtype names, or str / bytes)."""
B64_KEYS = ("b64", "shape", "type")
"""MindSpore Serving checks an object's keys in this (sorted) order, so its first complaint is about the first."""
INT32 = np.iinfo(np.int32)
MESSAGE_VALUE_LIMIT = 200
"""Longest piece of a client's value quoted back in an error message."""


def invalid(message: str) -> ServingError:
    return ServingError(ErrorCode.INVALID_ARGUMENT, message)


def ms_value(value: Any) -> Value:
    """One input value of a MindSpore Serving instance (parsed JSON) as a zmserve value."""
    if isinstance(value, dict):
        return _ms_object(value)
    if isinstance(value, list):
        return _ms_array(value)
    return _ms_scalar(value)


def _ms_scalar(value: Any) -> Value:
    if value is None:
        raise invalid("json value is null, it is not supported")
    if isinstance(value, bool):
        return np.array(value)
    if isinstance(value, int):
        return np.array(_int32(value), np.int32)
    if isinstance(value, float):
        with np.errstate(over="ignore"):  # 1e40 is inf in float32, as in MindSpore Serving
            return np.array(value, np.float32)
    if isinstance(value, str):
        return value
    raise invalid("json value type is unregistered")


def _int32(value: int) -> int:
    """MindSpore Serving wraps ints outside int32 silently (3000000000 arrives as -1294967296); zmserve refuses."""
    if not INT32.min <= value <= INT32.max:
        raise invalid(f"json int {value} is out of the int32 range")
    return value


def _leaf_kind(leaf: Any) -> str | None:
    """What a JSON leaf makes of the array it starts: its scalar kind; None when it is no kind at all."""
    if isinstance(leaf, bool):
        return "bool"
    if isinstance(leaf, int):
        return "int"
    if isinstance(leaf, float):
        return "float"
    if isinstance(leaf, str):
        return "str"
    if isinstance(leaf, dict):
        return "object"
    return None


_ARRAY_DTYPES = {"bool": np.dtype(bool), "int": np.dtype(np.int64), "float": np.dtype(np.float64)}
_TENSOR_DTYPES = {"bool": np.dtype(bool), "int": np.dtype(np.int32), "float": np.dtype(np.float32)}


def _ms_array(value: list) -> Value:
    shape: list[int] = []
    leaf: Any = value
    while isinstance(leaf, list) and leaf:
        shape.append(len(leaf))
        leaf = leaf[0]
    if not shape:
        raise invalid("json array, shape is empty")
    kind = _leaf_kind(leaf)
    if kind is None:
        raise invalid("json array, data type is unknown")
    if kind in ("str", "object"):
        return _ms_string_array(value, shape, kind, leaf)
    try:
        with np.errstate(over="ignore"):
            array = np.array(value)
    except (ValueError, OverflowError):
        array = None
    if array is None or array.shape != tuple(shape) or array.dtype != _ARRAY_DTYPES[kind]:
        _walk_array(value, 0, shape, kind)  # raises MindSpore Serving's message for the first bad element
        raise invalid("json array, elements type is not equal")  # e.g. an int too large for int64
    if kind == "int" and array.size and (array.min() < INT32.min or array.max() > INT32.max):
        raise invalid(f"json array holds ints outside the int32 range [{array.min()}, {array.max()}]")
    with np.errstate(over="ignore"):
        return array.astype(_TENSOR_DTYPES[kind])


def _walk_array(node: Any, depth: int, shape: list[int], kind: str) -> None:
    """MindSpore Serving's own walk over a tensor: raise its message for the first element that does not fit."""
    if depth >= len(shape):
        raise invalid(f"invalid json array: current depth {depth} is more than shape dims {len(shape)}")
    if not isinstance(node, list):
        raise invalid("invalid json array: json type is not array")
    if len(node) != shape[depth]:
        raise invalid(f"invalid json array: json size is {len(node)}, the dim {depth} expected to be {shape[depth]}")
    if depth + 1 < len(shape):
        for child in node:
            _walk_array(child, depth + 1, shape, kind)
        return
    for element in node:
        element_kind = _leaf_kind(element)
        if element_kind not in ("bool", "int", "float", "str"):
            raise invalid("json array, data should be number, bool, string or bytes")
        if element_kind != kind:
            raise invalid("json array, elements type is not equal")
        if kind == "int":
            _int32(element)


def _ms_string_array(value: list, shape: list[int], kind: str, leaf: Any) -> Value:
    """`["text"]` or `[{"b64": ...}]`: MindSpore Serving takes strings and bytes one at a time."""
    if kind == "str":
        if math.prod(shape) != 1:
            raise invalid("json array, string or bytes type only support one item")
        return leaf
    type_name = leaf.get("type", "bytes")
    if not isinstance(type_name, str) or type_name not in MS_TYPES:
        raise invalid("json array, data type is unknown")
    object_kind = MS_TYPES[type_name]
    if object_kind not in ("str", "bytes"):
        raise invalid("json array, item is object type, object only support string or bytes type")
    if math.prod(shape) != 1:
        raise invalid("json array, string or bytes type only support one item")
    return _b64_payload(leaf.get("b64"), object_kind, [])


def _ms_object(value: dict) -> Value:
    """`{"b64": ..., "type": ..., "shape": [...]}`, checked the way MindSpore Serving checks it."""
    if not value:
        raise invalid("json object, value is empty")
    if len(value) > 3:
        raise invalid("json object, items size is more than 3, only support specified ['b64', 'type', 'shape']")
    for key in sorted(value):
        item = value[key]
        if key == "type":
            if not isinstance(item, str):
                raise invalid("json object, key is 'type', value should be string type")
            if item not in MS_TYPES:
                raise invalid(f"json object, specified type:'{item}' is illegal")
        elif key == "shape":
            _check_shape(item)
        elif key != "b64":
            raise invalid(f"json object, key is not ['b64', 'type', 'shape'], fail key:{key}")
    if "b64" not in value:
        raise invalid("json object, 'b64' should be specified only one time")
    kind = MS_TYPES[value.get("type", "bytes")]
    shape = value.get("shape", [])
    if kind in ("str", "bytes") and math.prod(shape) != 1:
        raise invalid("json object, only support scalar when data type is string or bytes, please check 'type' "
                      "or 'shape'")
    return _b64_payload(value["b64"], kind, shape)


def _check_shape(shape: Any) -> None:
    if not isinstance(shape, list):
        raise invalid("json object, key is 'shape', value should be array type")
    after_zero = False
    for dim in shape:
        if after_zero:
            raise invalid(f"json object, key is 'shape', invalid shape value {orjson.dumps(shape).decode()}")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise invalid("json object, key is 'shape', array value should be unsigned integer")
        after_zero = dim == 0


def _b64_payload(encoded: Any, kind: str, shape: list[int]) -> Value:
    if not isinstance(encoded, str):
        raise invalid("get scalar data failed, type is string, but json is not string type")
    try:
        raw = pybase64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"'{_quote(encoded)}' is illegal b64 encode string") from None
    if kind == "bytes":
        return raw
    if kind == "str":
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise invalid("a b64 value of type 'str' must be UTF-8 (use type 'bytes' for raw bytes)") from None
    dtype = np.dtype(kind)
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise invalid(f"size is not matched, decode base64 size:{len(raw)}; Given info: type:{kind}; "
                      f"type size:{dtype.itemsize}; element nums:{count}")
    return raw_tensor(raw, kind, shape)


def raw_tensor(raw: bytes, kind: str, shape: list[int]) -> np.ndarray:
    """Raw little-endian elements (a b64 value's, a gRPC tensor's `data`) as an array of `shape`, without a copy;
    the caller has checked the byte count and says so in its own scheme's words."""
    return np.frombuffer(raw, np.dtype(kind)).reshape(shape)


def _quote(text: str) -> str:
    return text if len(text) <= MESSAGE_VALUE_LIMIT else text[:MESSAGE_VALUE_LIMIT] + "..."


def ms_reply_value(value: Value) -> Any:
    """A zmserve output as MindSpore Serving writes it: numbers and nested lists, floats printed as the double
    their float32 is (0.1f -> 0.10000000149011612), str as a string, bytes as `{"b64": ...}`.

    Arrays stay numpy (orjson writes them without a Python list in between)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b64": pybase64.b64encode(value).decode()}
    array = np.asarray(value)
    if array.ndim == 0:
        return array.item()
    if array.dtype.kind == "f":
        return array.astype(np.float64)
    return np.ascontiguousarray(array)


# ---- Open Inference Protocol -----------------------------------------------------------------------------------
OIP_DTYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "bytes",
}
"""OIP datatype -> numpy dtype name; BYTES carries one str or bytes value."""
OIP_NAME_OF_DTYPE = {name: oip for oip, name in OIP_DTYPES.items()} | {"str": "BYTES"}
BYTES_LENGTH = struct.Struct("<I")
"""A BYTES element in the binary-data extension: its length as 4 little-endian bytes, then the bytes."""


def oip_input(name: str, datatype: Any, shape: Any, data: Any = None, raw: memoryview | None = None) -> Value:
    """One OIP input tensor as a zmserve value, from JSON `data` or from its `raw` binary-data bytes."""
    kind = OIP_DTYPES.get(datatype) if isinstance(datatype, str) else None
    if kind is None:
        raise invalid(f"input {name!r}: datatype {datatype!r} is not one of {sorted(OIP_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise invalid(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    count = math.prod(shape)
    if kind == "bytes":
        return _oip_bytes_input(name, shape, count, data, raw)
    dtype = np.dtype(kind)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise invalid(f"input {name!r}: {datatype}{shape} needs {count * dtype.itemsize} bytes of binary data, "
                          f"got {len(raw)}")
        return np.frombuffer(raw, dtype).reshape(shape)
    if data is None:
        raise invalid(f"input {name!r} has neither 'data' nor a 'binary_data_size' parameter")
    try:
        with np.errstate(over="ignore"):
            array = np.array(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as error:
        raise invalid(f"input {name!r}: data is not {datatype}: {error}") from None
    if array.size != count:
        raise invalid(f"input {name!r}: shape {shape} holds {count} elements, data has {array.size}")
    return array.reshape(shape)


def _oip_bytes_input(name: str, shape: list[int], count: int, data: Any, raw: memoryview | None) -> Value:
    """zmserve has no string tensors: a BYTES input is one str (JSON) or bytes (binary) value."""
    if count != 1:
        raise invalid(f"input {name!r}: a BYTES input holds one element in zmserve (one str or bytes value); "
                      f"shape {shape} holds {count}")
    if raw is not None:
        if len(raw) < BYTES_LENGTH.size:
            raise invalid(f"input {name!r}: BYTES binary data is shorter than its 4-byte length")
        (length,) = BYTES_LENGTH.unpack_from(raw)
        if len(raw) != BYTES_LENGTH.size + length:
            raise invalid(f"input {name!r}: BYTES element says {length} bytes, {len(raw) - BYTES_LENGTH.size} "
                          "follow")
        return bytes(raw[BYTES_LENGTH.size:])
    while isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, str):
        raise invalid(f"input {name!r}: BYTES data in JSON must be one string, got {_quote(repr(data))}")
    return data


def oip_datatype(value: Value) -> str:
    if isinstance(value, str | bytes):
        return "BYTES"
    name = OIP_NAME_OF_DTYPE.get(np.asarray(value).dtype.name)
    if name is None:
        raise ServingError(ErrorCode.INTERNAL, f"output of dtype {np.asarray(value).dtype} has no OIP datatype")
    return name


def oip_shape(value: Value) -> list[int]:
    """str and bytes are one-element BYTES tensors ([1]); arrays keep their shape ([] for a scalar)."""
    return [1] if isinstance(value, str | bytes) else list(np.asarray(value).shape)


def oip_json_data(value: Value) -> Any | None:
    """The output's flat row-major `data`, or None when it cannot be JSON (bytes that are not UTF-8)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, bytes):
        try:
            return [value.decode()]
        except UnicodeDecodeError:
            return None
    array = np.asarray(value).reshape(-1)
    return array.astype(np.float32) if array.dtype == np.float16 else array  # orjson writes no float16


def oip_binary_data(value: Value) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return BYTES_LENGTH.pack(len(value)) + value
    return np.ascontiguousarray(value).tobytes()
