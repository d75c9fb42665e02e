"""The MindSpore Serving gRPC request set: what a `mindspore_serving.client.Client` sends (servable, method,
version, instances as Python values) and what its `infer` returns from zmserve's gateway. Where MindSpore Serving
2.0.2 answers otherwise, `differs` says why (docs/HTTP.md, "gRPC: differences from MindSpore Serving").

Three users: `test_grpc_ms.py` sends them through a client generated from the same proto (ms_grpc_client.py,
which encodes and parses as MindSpore Serving's client does); `benchmarks/peers/mindspore_serving/
grpc_conformance.py` sends them through MindSpore Serving's own client to MindSpore Serving and to zmserve and
prints every difference. That script imports this file under the peer's Python 3.9, so it stays 3.9-compatible
and needs only numpy.

Both sides serve `conform` (ms_rest_cases.CONFORM_METHODS): `predict(x)` the MatMul, `echo`, `type_of`, `swap`,
`fail`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SERVABLE = "conform"
ONES = np.ones((128, 96), np.float32)
Y = np.full((128, 16), -48.0, np.float32)
METHODS = "['echo', 'fail', 'predict', 'swap', 'type_of']"
DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
          "float64"]

# Why MindSpore Serving's answer differs.
MESSAGE = "message"
"""An error the broker or worker finds: same place (the reply's error_msg), zmserve's own text."""
BYTES = "bytes"
"""A bytes value reaches a Python stage as bytes in zmserve; MindSpore Serving's differs (see docs/HTTP.md)."""
EXTRA_INPUT = "extra_input"
"""MindSpore Serving ignores an input the method does not take; zmserve refuses it."""
SPLIT = "split"
"""Each instance is its own broker request: one instance's failure is that instance's."""
NO_ANSWER = "no_answer"
"""MindSpore Serving 2.0.2 never answers this request (its client, which has no deadline, waits forever)."""


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    instances: Any
    """What is passed to `Client.infer`: one dict, or a list of dicts."""
    answer: Any
    """What `Client.infer` returns from zmserve: a list of dicts (outputs, or {"error": message} for a failed
    instance), or {"error": message} when the whole request failed."""
    differs: tuple[str, ...] = ()
    version: int = 0
    servable: str = SERVABLE


def arange(dtype: str) -> np.ndarray:
    return (np.arange(6) % 2 == 1 if dtype == "bool" else np.arange(6)).astype(dtype).reshape(2, 3)


def error(message: str) -> dict[str, str]:
    return {"error": message}


CASES = [
    Case("matmul", "predict", {"x": ONES}, [{"y": Y}]),
    Case("matmul_tuple_of_instances", "predict", ({"x": ONES}, {"x": 2 * ONES}), [{"y": Y}, {"y": 2 * Y}]),
    *[Case(f"echo_{dtype}", "echo", {"x": arange(dtype)}, [{"y": arange(dtype)}]) for dtype in DTYPES],
    Case("numpy_scalar", "echo", {"x": np.float32(1.5)}, [{"y": np.array(1.5, np.float32)}]),
    Case("empty_tensor", "echo", {"x": np.zeros((3, 0), np.float32)}, [{"y": np.zeros((3, 0), np.float32)}]),
    Case("zero_dim_first", "echo", {"x": np.zeros((0, 3), np.float32)},
         error("Instances input x check failed, detail: Tensor check failed: input  shape [0, 3] invalid")),
    Case("python_int", "type_of", {"x": 1}, [{"y": "ndarray int64 [1]"}]),
    Case("python_float", "type_of", {"x": 1.5}, [{"y": "ndarray float64 [1]"}]),
    Case("python_bool", "type_of", {"x": True}, [{"y": "ndarray bool [1]"}]),
    Case("python_int_echo", "echo", {"x": 7}, [{"y": np.array([7], np.int64)}]),
    Case("str", "type_of", {"x": "abc"}, [{"y": "str 'abc'"}]),
    Case("str_echo", "echo", {"x": "héllo"}, [{"y": "héllo"}]),
    Case("bytes", "type_of", {"x": b"abc"}, [{"y": "bytes b'abc'"}], (BYTES,)),
    Case("bytes_echo", "echo", {"x": b"\x00\xffabc"}, [{"y": b"\x00\xffabc"}], (BYTES,)),
    Case("several_instances", "echo", [{"x": 1}, {"x": "s"}, {"x": np.float32(2)}],
         [{"y": np.array([1], np.int64)}, {"y": "s"}, {"y": np.array(2, np.float32)}]),
    Case("two_outputs", "swap", {"a": 1, "b": "t"}, [{"b": "t", "a": np.array([1], np.int64)}]),
    Case("explicit_version", "echo", {"x": 1}, [{"y": np.array([1], np.int64)}], version=1),
    # errors of one instance, of every instance, of the request
    Case("per_instance_error", "predict", [{"x": np.float32(1)}, {"x": ONES}],
         [error("instance 0: model input 'x' must have shape (128, 96) (-1 = any), got ()"), {"y": Y}], (MESSAGE,)),
    Case("every_instance_fails", "predict", [{"x": np.float32(1)}, {"x": np.ones((128, 96), np.int32)}],
         [error("instance 0: model input 'x' must have shape (128, 96) (-1 = any), got ()"),
          error("instance 0: model input 'x' must be float32, got int32")], (MESSAGE,)),
    Case("wrong_dtype", "predict", {"x": np.ones((128, 96), np.float64)},
         error("instance 0: model input 'x' must be float32, got float64"), (MESSAGE,)),
    Case("stage_raises", "fail", {"x": 1},
         error("instance 0: stage 'explode' raised RuntimeError: this stage always fails"), (MESSAGE,)),
    Case("same_failure_twice", "fail", [{"x": 1}, {"x": 2}],
         error("instance 0: stage 'explode' raised RuntimeError: this stage always fails"), (MESSAGE,)),
    Case("unknown_version", "echo", {"x": 1}, error(f"servable '{SERVABLE}' has no version 2; versions: [1]"),
         (MESSAGE,), version=2),
    Case("unknown_servable", "echo", {"x": 1},
         error(f"servable 'nope' is not served; served: {SERVABLE} (version 1, methods {METHODS})"), (MESSAGE,),
         servable="nope"),
    Case("unknown_method", "nope", {"x": 1}, error(f"servable '{SERVABLE}' has no method 'nope'; methods: {METHODS}"),
         (MESSAGE,)),
    Case("wrong_input_name", "echo", {"z": 1}, error("instance 0: method 'echo' takes inputs ['x'], got ['z']"),
         (MESSAGE,)),
    Case("missing_input", "swap", {"a": 1}, error("instance 0: method 'swap' takes inputs ['a', 'b'], got ['a']"),
         (MESSAGE,)),
    Case("extra_input", "echo", {"x": 1, "z": 1}, error("instance 0: method 'echo' takes inputs ['x'], got ['x', 'z']"),
         (MESSAGE, EXTRA_INPUT)),
    Case("one_instance_missing_an_input", "echo", [{"x": 1}, {"z": 1}],
         [{"y": np.array([1], np.int64)}, error("instance 0: method 'echo' takes inputs ['x'], got ['z']")],
         (MESSAGE, SPLIT)),
    Case("no_instances", "echo", [],
         error(f"Instances count of request cannot be 0, servable: {SERVABLE}, method: echo"), (NO_ANSWER,)),
]


def same(a: Any, b: Any) -> bool:
    """Whether two `Client.infer` results are equal: arrays by dtype, shape and values; the rest by ==."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and bool(np.array_equal(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))  # noqa: B905 (Python 3.9: no strict)
    return type(a) is type(b) and a == b


def describe(value: Any) -> str:
    """A short text of a result, for a difference report."""
    if isinstance(value, np.ndarray):
        flat = value.reshape(-1)[:4].tolist()
        return f"ndarray {value.dtype} {list(value.shape)} {flat}{'...' if value.size > 4 else ''}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe(v) for v in value) + "]"
    return repr(value)
