"""Headers and tensors on the wire.

A message is one msgpack header frame followed by one frame per value. The header describes each value
(`name`, `dtype`, `shape`); the value's bytes travel in their own frame, sent without copying (pyzmq copies only
frames under the socket's copy threshold) and read back with `np.frombuffer` on the received frame. No pickle,
no msgpack-numpy: putting arrays inside the msgpack body would copy them on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import zmq

from zmserve.protocol import PROTOCOL_VERSION, ErrorCode, MessageType, ServingError

Value = np.ndarray | str | bytes | int | float | bool
Instance = dict[str, Value]
Frame = zmq.Frame | bytes | memoryview

STRING_DTYPE = "str"
BYTES_DTYPE = "bytes"
ALLOWED_DTYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64"}
)
_NAME_OF_DTYPE = {np.dtype(name): name for name in ALLOWED_DTYPES}
_DTYPE_OF_NAME = {name: np.dtype(name) for name in ALLOWED_DTYPES}


def dtype_name(dtype: np.dtype) -> str | None:
    """The wire name of a native-order dtype, None if it is not allowed (a dict lookup: `dtype.name` is slow)."""
    return _NAME_OF_DTYPE.get(dtype)


def pack_header(message_type: MessageType, **fields: Any) -> bytes:
    """Encode a header: protocol version, message type and the given fields."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": str(message_type), **fields}, use_bin_type=True)


def unpack_header(frame: Frame) -> dict[str, Any]:
    """Decode and check a header; anything malformed raises ServingError(INVALID_ARGUMENT)."""
    try:
        header = msgpack.unpackb(_buffer(frame), raw=False, strict_map_key=True)
    except Exception as exc:
        raise ServingError(ErrorCode.INVALID_ARGUMENT, f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ServingError(ErrorCode.INVALID_ARGUMENT, "header must be a msgpack map")
    if header.get("v") != PROTOCOL_VERSION:
        raise ServingError(
            ErrorCode.INVALID_ARGUMENT,
            f"unsupported protocol version {header.get('v')!r}; this server speaks {PROTOCOL_VERSION}",
        )
    if header.get("type") not in MessageType.__members__.values():
        raise ServingError(ErrorCode.INVALID_ARGUMENT, f"unknown message type {header.get('type')!r}")
    return header


def peek_request_id(frame: Frame) -> Any:
    """The `id` of a header that failed its checks (wrong version, unknown type), so the error reply can still
    be matched by the client; None when there is none to find."""
    try:
        header = msgpack.unpackb(_buffer(frame), raw=False)
    except Exception:
        return None
    request_id = header.get("id") if isinstance(header, dict) else None
    return request_id if isinstance(request_id, int | str) else None


def encode_values(values: Instance) -> tuple[list[dict[str, Any]], list[Any]]:
    """Describe each value in the header and give its bytes as a frame (an array itself when possible)."""
    descriptors: list[dict[str, Any]] = []
    frames: list[Any] = []
    for name, value in values.items():
        if not isinstance(name, str):
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"input names must be strings, got {name!r}")
        if isinstance(value, str):
            descriptors.append({"name": name, "dtype": STRING_DTYPE, "shape": []})
            frames.append(value.encode())
            continue
        if isinstance(value, bytes | bytearray | memoryview):
            descriptors.append({"name": name, "dtype": BYTES_DTYPE, "shape": []})
            frames.append(bytes(value))
            continue
        array = np.asarray(value)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        wire_dtype = dtype_name(array.dtype)
        if wire_dtype is None:
            raise ServingError(
                ErrorCode.INVALID_ARGUMENT, f"input {name!r} has unsupported dtype {array.dtype}"
            )
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        descriptors.append({"name": name, "dtype": wire_dtype, "shape": list(array.shape)})
        frames.append(array.reshape(-1).view(np.uint8) if array.ndim == 0 else array)
    return descriptors, frames


def decode_values(descriptors: Any, frames: Sequence[Frame]) -> Instance:
    """Rebuild values from their descriptors and frames; arrays share memory with the frames (no copy)."""
    if not isinstance(descriptors, list) or len(descriptors) != len(frames):
        raise ServingError(
            ErrorCode.INVALID_ARGUMENT,
            f"header describes {len(descriptors) if isinstance(descriptors, list) else 'no'} values "
            f"but {len(frames)} value frames arrived",
        )
    values: Instance = {}
    for descriptor, frame in zip(descriptors, frames, strict=True):
        name, dtype, shape = _check_descriptor(descriptor)
        buffer = _buffer(frame)
        if dtype == STRING_DTYPE:
            try:
                values[name] = bytes(buffer).decode()
            except UnicodeDecodeError:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, f"input {name!r} is not UTF-8") from None
            continue
        if dtype == BYTES_DTYPE:
            values[name] = bytes(buffer)
            continue
        numpy_dtype = _DTYPE_OF_NAME[dtype]
        expected = math.prod(shape) * numpy_dtype.itemsize
        if expected != buffer.nbytes:
            raise ServingError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {name!r}: {dtype}{tuple(shape)} needs {expected} bytes, frame has {buffer.nbytes}",
            )
        values[name] = np.frombuffer(buffer, dtype=numpy_dtype).reshape(shape)
    return values


def encode_instances(instances: Sequence[Instance]) -> tuple[list[list[dict[str, Any]]], list[Any]]:
    """Encode several instances: one descriptor list per instance, their frames in order."""
    all_descriptors: list[list[dict[str, Any]]] = []
    all_frames: list[Any] = []
    for instance in instances:
        if not isinstance(instance, dict):
            raise ServingError(ErrorCode.INVALID_ARGUMENT, "each instance must be a dict of name -> value")
        descriptors, frames = encode_values(instance)
        all_descriptors.append(descriptors)
        all_frames.extend(frames)
    return all_descriptors, all_frames


def decode_instances(descriptors: Any, frames: Sequence[Frame]) -> list[Instance]:
    """Inverse of encode_instances."""
    if not isinstance(descriptors, list) or not all(isinstance(d, list) for d in descriptors):
        raise ServingError(ErrorCode.INVALID_ARGUMENT, "header field 'instances' must be a list of lists")
    total = sum(len(d) for d in descriptors)
    if total != len(frames):
        raise ServingError(
            ErrorCode.INVALID_ARGUMENT, f"header describes {total} values but {len(frames)} value frames arrived"
        )
    instances: list[Instance] = []
    start = 0
    for instance_descriptors in descriptors:
        end = start + len(instance_descriptors)
        instances.append(decode_values(instance_descriptors, frames[start:end]))
        start = end
    return instances


def _check_descriptor(descriptor: Any) -> tuple[str, str, list[int]]:
    if not isinstance(descriptor, dict):
        raise ServingError(ErrorCode.INVALID_ARGUMENT, "a value descriptor must be a map")
    name, dtype, shape = descriptor.get("name"), descriptor.get("dtype"), descriptor.get("shape")
    if not isinstance(name, str):
        raise ServingError(ErrorCode.INVALID_ARGUMENT, f"value name must be a string, got {name!r}")
    if dtype not in ALLOWED_DTYPES and dtype not in (STRING_DTYPE, BYTES_DTYPE):
        raise ServingError(ErrorCode.INVALID_ARGUMENT, f"input {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ServingError(ErrorCode.INVALID_ARGUMENT, f"input {name!r} has an invalid shape {shape!r}")
    return name, dtype, shape


def _buffer(frame: Frame) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return memoryview(frame)
