"""The MindSpore Serving REST request set: each request, the answer zmserve's gateway gives, and, where MindSpore
Serving 2.0.2 answers otherwise, why (docs/HTTP.md "Differences"). The gateway tests assert zmserve's answers;
`benchmarks/peers/mindspore_serving/rest_conformance.py` sends the same requests to both and prints every
difference.

Both sides serve the servable `conform` (`CONFORM_METHODS`): `predict(x)` is the MatMul (x 128x96 float32 times
0.5, negated); `echo(x)` returns x; `type_of(x)` says what the method received; `swap(a, b)` returns (b, a);
`fail(x)` raises in its Python stage.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

SERVABLE = "conform"
CONFORM_METHODS = '''

@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y


def identity(x):
    return x


def describe(x):
    import numpy as np

    if isinstance(x, np.ndarray):
        return f"ndarray {x.dtype} {list(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def swapped(a, b):
    return b, a


def explode(x):
    raise RuntimeError("this stage always fails")


@register.register_method(output_names=["y"])
def echo(x):
    y = register.add_stage(identity, x, outputs_count=1)
    return y


@register.register_method(output_names=["y"])
def type_of(x):
    y = register.add_stage(describe, x, outputs_count=1)
    return y


@register.register_method(output_names=["b", "a"])
def swap(a, b):
    b2, a2 = register.add_stage(swapped, a, b, outputs_count=2)
    return b2, a2


@register.register_method(output_names=["y"])
def fail(x):
    y = register.add_stage(explode, x, outputs_count=1)
    return y
'''
ZMSERVE_CONFIG = '''from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size=1, stage_size=1, with_batch_dim=False)
''' + CONFORM_METHODS
MINDSPORE_SERVING_CONFIG = '''from mindspore_serving.server import register

model = register.declare_model(model_file="matmul.mindir", model_format="MindIR", with_batch_dim=False)
''' + CONFORM_METHODS

ONES = np.ones((128, 96), np.float32)
Y = [[-48.0] * 16] * 128
B64_ONES = {"b64": base64.b64encode(ONES.tobytes()).decode(), "type": "fp32", "shape": [128, 96]}

# Why MindSpore Serving's answer differs (docs/HTTP.md, "Differences from MindSpore Serving 2.0.2").
STATUS = "status"
"""MindSpore Serving answers every error with HTTP 200; zmserve's status says whose fault it is."""
MESSAGE = "message"
"""An error the broker or worker finds: same shape ({"error_msg": ...}), zmserve's own text."""
BYTES = "bytes"
"""A b64 value of type bytes reaches a Python stage as bytes in zmserve, as a uint8 array in MindSpore Serving."""
SHAPE = "shape"
"""zmserve checks a model input's shape, MindSpore Serving only its byte size."""
LENIENT = "lenient"
"""zmserve's float tensors accept JSON ints and bools among the floats (numpy's promotion)."""
INT32 = "int32"
"""MindSpore Serving wraps an int outside int32 silently; zmserve refuses it."""
EXTRA_INPUT = "extra_input"
"""MindSpore Serving ignores an input the method does not take; zmserve refuses it."""
SPLIT = "split"
"""Each instance is its own broker request: a missing input fails that instance, not the whole request."""
JSON_ERROR = "json_error"
"""The JSON parser's own words after "Illegal JSON format." (nlohmann vs orjson)."""
GET = "get"
"""A GET is 405 with zmserve's text."""


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes
    status: int
    """zmserve's HTTP status."""
    answer: Any
    """zmserve's JSON answer."""
    differs: tuple[str, ...] = ()
    """Why MindSpore Serving answers otherwise: keys above; () = the same answer (status and body)."""
    http_method: str = "POST"


def body(document: Any) -> bytes:
    return json.dumps(document).encode()


def instances(*items: dict[str, Any]) -> bytes:
    return body({"instances": list(items)})


def error(message: str) -> dict[str, str]:
    return {"error_msg": message}


def parse_failed(message: str) -> dict[str, str]:
    return error("Parser request failed, " + message)


ECHO = f"/model/{SERVABLE}:echo"
TYPE_OF = f"/model/{SERVABLE}:type_of"
PREDICT = f"/model/{SERVABLE}:predict"
SWAP = f"/model/{SERVABLE}:swap"
METHODS = "['echo', 'fail', 'predict', 'swap', 'type_of']"
FAIL = f"/model/{SERVABLE}:fail"

CASES = [
    # tensors, list and b64
    Case("list_tensor", PREDICT, instances({"x": ONES.tolist()}), 200, {"instances": [{"y": Y}]}),
    Case("b64_tensor", PREDICT, instances({"x": B64_ONES}), 200, {"instances": [{"y": Y}]}),
    Case("list_int_tensor", TYPE_OF, instances({"x": [[1, 2], [3, 4]]}), 200,
         {"instances": [{"y": "ndarray int32 [2, 2]"}]}),
    Case("list_bool_tensor", TYPE_OF, instances({"x": [True, False]}), 200, {"instances": [{"y": "ndarray bool [2]"}]}),
    Case("list_one_string", TYPE_OF, instances({"x": ["abc"]}), 200, {"instances": [{"y": "str 'abc'"}]}),
    Case("b64_fp16", ECHO, instances({"x": {"b64": "AAAAAAAAgD8=", "type": "fp16", "shape": [4]}}), 200,
         {"instances": [{"y": [0.0, 0.0, 0.0, 1.875]}]}),
    Case("b64_uint8", ECHO, instances({"x": {"b64": "AAAAAAAAgD8=", "type": "uint8", "shape": [8]}}), 200,
         {"instances": [{"y": [0, 0, 0, 0, 0, 0, 128, 63]}]}),
    Case("b64_int64", TYPE_OF, instances({"x": {"b64": "AAAAAAAAgD8=", "type": "int64", "shape": [1]}}), 200,
         {"instances": [{"y": "ndarray int64 [1]"}]}),
    Case("b64_scalar_shape", ECHO, instances({"x": {"b64": "AAAAAA==", "type": "fp32", "shape": []}}), 200,
         {"instances": [{"y": 0.0}]}),
    Case("b64_empty_tensor", ECHO, instances({"x": {"b64": "", "type": "fp32", "shape": [0]}}), 200,
         {"instances": [{"y": []}]}),
    # each scalar type
    Case("scalar_int", TYPE_OF, instances({"x": 1}), 200, {"instances": [{"y": "ndarray int32 []"}]}),
    Case("scalar_float", TYPE_OF, instances({"x": 1.5}), 200, {"instances": [{"y": "ndarray float32 []"}]}),
    Case("scalar_bool", TYPE_OF, instances({"x": True}), 200, {"instances": [{"y": "ndarray bool []"}]}),
    Case("scalar_str", TYPE_OF, instances({"x": "abc"}), 200, {"instances": [{"y": "str 'abc'"}]}),
    Case("b64_str", TYPE_OF, instances({"x": {"b64": "YWJj", "type": "str"}}), 200,
         {"instances": [{"y": "str 'abc'"}]}),
    Case("b64_bytes", TYPE_OF, instances({"x": {"b64": "YWJj"}}), 200, {"instances": [{"y": "bytes b'abc'"}]},
         (BYTES,)),
    Case("b64_bytes_echo", ECHO, instances({"x": {"b64": "YWJj"}}), 200, {"instances": [{"y": {"b64": "YWJj"}}]},
         (BYTES,)),
    Case("float_as_double", ECHO, instances({"x": 0.1}), 200, {"instances": [{"y": 0.10000000149011612}]}),
    Case("float_overflow", ECHO, instances({"x": 1e40}), 200, {"instances": [{"y": None}]}),
    Case("int_out_of_range", ECHO, instances({"x": 3000000000}), 400,
         parse_failed("json int 3000000000 is out of the int32 range"), (STATUS, INT32)),
    # several instances, and the one-instance object form
    Case("several_instances", ECHO, instances({"x": 1}, {"x": 2.5}, {"x": "s"}, {"x": True}), 200,
         {"instances": [{"y": 1}, {"y": 2.5}, {"y": "s"}, {"y": True}]}),
    Case("instances_object", ECHO, body({"instances": {"x": 7}}), 200, {"instances": [{"y": 7}]}),
    Case("two_outputs", SWAP, instances({"a": 1, "b": "t"}), 200, {"instances": [{"a": 1, "b": "t"}]}),
    Case("per_instance_error", PREDICT, instances({"x": 1.0}, {"x": ONES.tolist()}), 200,
         {"instances": [error("instance 0: model input 'x' must have shape (128, 96) (-1 = any), got ()"),
                        {"y": Y}]}, (MESSAGE,)),
    Case("every_instance_fails", PREDICT, instances({"x": 1.0}, {"x": [[1]]}), 400,
         {"instances": [error("instance 0: model input 'x' must have shape (128, 96) (-1 = any), got ()"),
                        error("instance 0: model input 'x' must be float32, got int32")]}, (STATUS, MESSAGE)),
    Case("stage_raises", FAIL, instances({"x": 1}), 500,
         error("instance 0: stage 'explode' raised RuntimeError: this stage always fails"), (STATUS, MESSAGE)),
    # versions
    Case("explicit_version", f"/model/{SERVABLE}/version/1:echo", instances({"x": 1}), 200,
         {"instances": [{"y": 1}]}),
    Case("version_0_is_newest", f"/model/{SERVABLE}/version/0:echo", instances({"x": 1}), 200,
         {"instances": [{"y": 1}]}),
    Case("unknown_version", f"/model/{SERVABLE}/version/2:echo", instances({"x": 1}), 404,
         error(f"servable '{SERVABLE}' has no version 2; versions: [1]"), (STATUS, MESSAGE)),
    Case("version_not_a_number", f"/model/{SERVABLE}/version/abc:echo", instances({"x": 1}), 400,
         error("please check url, the keyword:[version] value invalid, request version number abc"), (STATUS,)),
    Case("version_negative", f"/model/{SERVABLE}/version/-1:echo", instances({"x": 1}), 400,
         error("please check url, version number range failed, request version number -1"), (STATUS,)),
    # names
    Case("unknown_servable", "/model/nope:echo", instances({"x": 1}), 404,
         error(f"servable 'nope' is not served; served: {SERVABLE} (version 1, methods {METHODS})"),
         (STATUS, MESSAGE)),
    Case("unknown_method", f"/model/{SERVABLE}:nope", instances({"x": 1}), 404,
         error(f"servable '{SERVABLE}' has no method 'nope'; methods: {METHODS}"), (STATUS, MESSAGE)),
    Case("no_method_in_url", f"/model/{SERVABLE}", instances({"x": 1}), 400,
         error("please check url, the keyword:[service method] must contain."), (STATUS,)),
    Case("wrong_input_name", ECHO, instances({"z": 1}), 400,
         error("instance 0: method 'echo' takes inputs ['x'], got ['z']"), (STATUS, MESSAGE)),
    Case("missing_input", SWAP, instances({"a": 1}), 400,
         error("instance 0: method 'swap' takes inputs ['a', 'b'], got ['a']"), (STATUS, MESSAGE)),
    Case("extra_input", ECHO, instances({"x": 1, "z": 1}), 400,
         error("instance 0: method 'echo' takes inputs ['x'], got ['x', 'z']"), (STATUS, MESSAGE, EXTRA_INPUT)),
    Case("one_instance_missing_an_input", ECHO, instances({"x": 1}, {"z": 1}), 200,
         {"instances": [{"y": 1}, error("instance 0: method 'echo' takes inputs ['x'], got ['z']")]},
         (MESSAGE, SPLIT)),
    # the body
    Case("malformed_json", ECHO, b'{"instances":[{"x":1}', 400,
         error("Illegal JSON format.unexpected end of data: line 1 column 22 (char 21)"), (STATUS, JSON_ERROR)),
    Case("missing_instances", ECHO, body({"inst": [{"x": 1}]}), 400,
         parse_failed("key 'instances' expects to exist once, but actually 0 times"), (STATUS,)),
    Case("not_an_object", ECHO, body([1]), 400,
         parse_failed("key 'instances' expects to exist once, but actually 0 times"), (STATUS,)),
    Case("empty_instances", ECHO, body({"instances": []}), 400,
         parse_failed("instances value is array type, but no value"), (STATUS,)),
    Case("empty_instance", ECHO, body({"instances": [{}]}), 400,
         parse_failed("json array, instance is object type, but no value"), (STATUS,)),
    Case("instances_without_keys", ECHO, body({"instances": [1, 2]}), 400,
         parse_failed("instances no key mode is not supported"), (STATUS,)),
    Case("empty_body", ECHO, b"", 400, error("http message invalid"), (STATUS,)),
    Case("get_method", ECHO, b"", 405, error("http message only support POST right now"), (STATUS,), "GET"),
    # shapes and element types
    Case("wrong_shape_b64", PREDICT, instances({"x": {**B64_ONES, "shape": [96, 128]}}), 400,
         error("instance 0: model input 'x' must have shape (128, 96) (-1 = any), got (96, 128)"),
         (STATUS, SHAPE)),
    Case("wrong_shape_list", PREDICT, instances({"x": [[1.0, 2.0]]}), 400,
         error("instance 0: model input 'x' must have shape (128, 96) (-1 = any), got (1, 2)"), (STATUS, MESSAGE)),
    Case("wrong_dtype", PREDICT, instances({"x": np.ones((128, 96), np.int32).tolist()}), 400,
         error("instance 0: model input 'x' must be float32, got int32"), (STATUS, MESSAGE)),
    Case("ragged_list", ECHO, instances({"x": [[1, 2], [3]]}), 400,
         parse_failed("invalid json array: json size is 1, the dim 1 expected to be 2"), (STATUS,)),
    Case("not_an_array_inside", ECHO, instances({"x": [[1, 2], 3]}), 400,
         parse_failed("invalid json array: json type is not array"), (STATUS,)),
    Case("int_then_float", ECHO, instances({"x": [1, 2.5]}), 400,
         parse_failed("json array, elements type is not equal"), (STATUS,)),
    Case("float_then_int", TYPE_OF, instances({"x": [[1.0, 2], [3, 4]]}), 200,
         {"instances": [{"y": "ndarray float32 [2, 2]"}]}, (LENIENT,)),
    Case("null_in_array", ECHO, instances({"x": [1, None]}), 400,
         parse_failed("json array, data should be number, bool, string or bytes"), (STATUS,)),
    Case("empty_array", ECHO, instances({"x": []}), 400, parse_failed("json array, shape is empty"), (STATUS,)),
    Case("empty_inner_array", ECHO, instances({"x": [[]]}), 400, parse_failed("json array, data type is unknown"),
         (STATUS,)),
    Case("null_value", ECHO, instances({"x": None}), 400, parse_failed("json value is null, it is not supported"),
         (STATUS,)),
    Case("two_strings", ECHO, instances({"x": ["a", "b"]}), 400,
         parse_failed("json array, string or bytes type only support one item"), (STATUS,)),
    Case("empty_input_name", ECHO, instances({"": 1}), 400, parse_failed("string key is empty"), (STATUS,)),
    # b64 objects
    Case("b64_size_mismatch", ECHO, instances({"x": {"b64": "AAAAAAAAgD8=", "type": "fp32", "shape": [3]}}), 400,
         parse_failed("size is not matched, decode base64 size:8; Given info: type:float32; type size:4; "
                      "element nums:3"), (STATUS,)),
    Case("b64_illegal", ECHO, instances({"x": {"b64": "AAA", "type": "int8", "shape": [2]}}), 400,
         parse_failed("'AAA' is illegal b64 encode string"), (STATUS,)),
    Case("b64_unknown_type", ECHO, instances({"x": {"b64": "AAAAAA==", "type": "complex", "shape": [1]}}), 400,
         parse_failed("json object, specified type:'complex' is illegal"), (STATUS,)),
    Case("b64_extra_key", ECHO, instances({"x": {"b64": "YWJj", "extra": 1}}), 400,
         parse_failed("json object, key is not ['b64', 'type', 'shape'], fail key:extra"), (STATUS,)),
    Case("b64_missing", ECHO, instances({"x": {"type": "str"}}), 400,
         parse_failed("json object, 'b64' should be specified only one time"), (STATUS,)),
    Case("b64_negative_shape", ECHO, instances({"x": {"b64": "AAAAAA==", "type": "fp32", "shape": [-1]}}), 400,
         parse_failed("json object, key is 'shape', array value should be unsigned integer"), (STATUS,)),
    Case("b64_bytes_two_elements", ECHO, instances({"x": {"b64": "YWJj", "type": "bytes", "shape": [2]}}), 400,
         parse_failed("json object, only support scalar when data type is string or bytes, please check 'type' "
                      "or 'shape'"), (STATUS,)),
    Case("b64_not_a_string", ECHO, instances({"x": {"b64": 123}}), 400,
         parse_failed("get scalar data failed, type is string, but json is not string type"), (STATUS,)),
    Case("empty_object", ECHO, instances({"x": {}}), 400, parse_failed("json object, value is empty"), (STATUS,)),
]
