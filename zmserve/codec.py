"""Values (tensors, strings, bytes) on the wire.

A message is one header frame (`zmserve.protocol`) followed by one frame per value. The header describes each
value with a `TensorSpec` (`name`, `dtype`, `shape`); the value's bytes travel in their own frame, sent without
copying (pyzmq copies only frames under the socket's copy threshold) and read back with `np.frombuffer` on the
received frame. No pickle, no msgpack-numpy: putting arrays inside the msgpack body would copy them on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

from zmserve.protocol import ErrorCode, ServingError, TensorSpec

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


def encode_values(values: Instance) -> tuple[list[TensorSpec], list[Any]]:
    """Describe each value with a TensorSpec and give its bytes as a frame (an array itself when possible)."""
    specs: list[TensorSpec] = []
    frames: list[Any] = []
    for name, value in values.items():
        if not isinstance(name, str):
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"input names must be strings, got {name!r}")
        if isinstance(value, str):
            specs.append(TensorSpec(name, STRING_DTYPE, []))
            frames.append(value.encode())
            continue
        if isinstance(value, bytes | bytearray | memoryview):
            specs.append(TensorSpec(name, BYTES_DTYPE, []))
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
        specs.append(TensorSpec(name, wire_dtype, list(array.shape)))
        frames.append(array.reshape(-1).view(np.uint8) if array.ndim == 0 else array)
    return specs, frames


def decode_values(specs: Sequence[TensorSpec], frames: Sequence[Frame]) -> Instance:
    """Rebuild values from their specs and frames; arrays share memory with the frames (no copy)."""
    if len(specs) != len(frames):
        raise ServingError(ErrorCode.INVALID_ARGUMENT,
                           f"header describes {len(specs)} values but {len(frames)} value frames arrived")
    values: Instance = {}
    for spec, frame in zip(specs, frames, strict=True):
        name, dtype, shape = spec.name, spec.dtype, spec.shape
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
        numpy_dtype = _DTYPE_OF_NAME.get(dtype)
        if numpy_dtype is None:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"input {name!r} has unsupported dtype {dtype!r}")
        if any(d < 0 for d in shape):
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"input {name!r} has an invalid shape {shape!r}")
        expected = math.prod(shape) * numpy_dtype.itemsize
        if expected != buffer.nbytes:
            raise ServingError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {name!r}: {dtype}{tuple(shape)} needs {expected} bytes, frame has {buffer.nbytes}",
            )
        values[name] = np.frombuffer(buffer, dtype=numpy_dtype).reshape(shape)
    return values


def encode_instances(instances: Sequence[Instance]) -> tuple[list[list[TensorSpec]], list[Any]]:
    """Encode several instances: one spec list per instance, their frames in order."""
    all_specs: list[list[TensorSpec]] = []
    all_frames: list[Any] = []
    for instance in instances:
        if not isinstance(instance, dict):
            raise ServingError(ErrorCode.INVALID_ARGUMENT, "each instance must be a dict of name -> value")
        specs, frames = encode_values(instance)
        all_specs.append(specs)
        all_frames.extend(frames)
    return all_specs, all_frames


def decode_instances(specs: Sequence[Sequence[TensorSpec]], frames: Sequence[Frame]) -> list[Instance]:
    """Inverse of encode_instances."""
    total = sum(len(s) for s in specs)
    if total != len(frames):
        raise ServingError(
            ErrorCode.INVALID_ARGUMENT, f"header describes {total} values but {len(frames)} value frames arrived"
        )
    instances: list[Instance] = []
    start = 0
    for instance_specs in specs:
        end = start + len(instance_specs)
        instances.append(decode_values(instance_specs, frames[start:end]))
        start = end
    return instances


def _buffer(frame: Frame) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return memoryview(frame)
