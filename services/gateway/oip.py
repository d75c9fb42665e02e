"""The Open Inference Protocol (KServe v2), the REST API that Triton, KServe and MLServer speak and
`tritonclient` calls: health, server and model metadata, model ready, and infer with JSON tensors or the
binary-data extension (`Inference-Header-Content-Length`).

A model is a servable, its versions are the servable's versions, and an infer request is one zmserve instance: its
input tensors are the method's inputs by name. The method is the servable's first (in the broker's list) unless
the request names another: request parameter `method` in an infer body, query parameter `?method=` on any model
URL. Errors are `{"error": "..."}` with the status of their zmserve code (`errors.http_status`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

import zmserve
from zmserve.codec import Instance
from zmserve.protocol import ErrorCode, ServingError
from zmserve_services.gateway.broker_link import ServableVersion, Served, TensorSpec
from zmserve_services.gateway.values import (
    OIP_NAME_OF_DTYPE,
    invalid,
    oip_binary_data,
    oip_datatype,
    oip_input,
    oip_json_data,
    oip_shape,
)

SERVER_NAME = "zmserve"
PLATFORM = "zmserve"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"
"""The binary-data extension's header: how many body bytes are the JSON document; tensors' bytes follow."""
METHOD_PARAMETER = "method"


@dataclass(frozen=True)
class InferRequest:
    id: Any
    method: str | None
    timeout: float | None
    """Seconds (the request carries microseconds, as Triton's `timeout` parameter)."""
    inputs: Instance
    outputs: list[tuple[str, bool]] | None
    """Requested outputs and whether each wants binary data; None = every output."""
    binary_outputs: bool
    """The request parameter `binary_data_output`: the default for outputs not asked for by name."""


def server_metadata() -> bytes:
    return orjson.dumps({"name": SERVER_NAME, "version": zmserve.__version__, "extensions": EXTENSIONS})


def parse_version(text: str | None) -> int:
    """An OIP version string as a zmserve version (0 = the newest ready one)."""
    if text is None:
        return 0
    if not text.isdigit() or int(text) < 1:
        raise invalid(f"model version must be a positive integer, got {text!r}")
    return int(text)


def choose(served: Served, name: str, version: int) -> ServableVersion:
    """The (servable, version) a model URL names, or the error the broker would give for it."""
    versions = [v for v in served.versions if v.servable == name]
    if not versions:
        if name in served.lost:
            raise ServingError(ErrorCode.UNAVAILABLE, f"servable {name!r} has no worker right now; retry")
        raise ServingError(ErrorCode.NOT_FOUND, f"servable {name!r} is not served; served: "
                                                f"{sorted({v.servable for v in served.versions})}")
    if version == 0:  # as the broker routes version 0: the newest ready version, else the newest
        return max([v for v in versions if v.ready] or versions, key=lambda v: v.version)
    for candidate in versions:
        if candidate.version == version:
            return candidate
    raise ServingError(ErrorCode.NOT_FOUND, f"servable {name!r} has no version {version}; versions: "
                                            f"{sorted(v.version for v in versions)}")


def choose_method(chosen: ServableVersion, method: str | None) -> str:
    if method is None:
        if not chosen.methods:
            raise ServingError(ErrorCode.NOT_FOUND, f"servable {chosen.servable!r} has no methods")
        return chosen.methods[0]
    if method not in chosen.methods:
        raise ServingError(ErrorCode.NOT_FOUND, f"servable {chosen.servable!r} has no method {method!r}; "
                                                f"methods: {list(chosen.methods)}")
    return method


def model_metadata(served: Served, name: str, version: int, method: str | None) -> bytes:
    chosen = choose(served, name, version)
    method = choose_method(chosen, method)
    signature = chosen.signatures.get(method)
    return orjson.dumps({
        "name": name,
        "versions": [str(v.version) for v in sorted(served.versions, key=lambda v: v.version) if v.servable == name],
        "platform": PLATFORM,
        "inputs": [_tensor_metadata(spec) for spec in signature.inputs] if signature else [],
        "outputs": [_tensor_metadata(spec) for spec in signature.outputs] if signature else [],
        "parameters": {"method": method, "methods": list(chosen.methods)},
    })


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """Name always; datatype and shape only when the worker reported them (a method input that goes to a Python
    stage has no dtype a worker can know)."""
    entry: dict[str, Any] = {"name": spec.name}
    if spec.dtype is not None and spec.dtype in OIP_NAME_OF_DTYPE:
        entry["datatype"] = OIP_NAME_OF_DTYPE[spec.dtype]
    if spec.shape is not None:
        entry["shape"] = list(spec.shape)
    return entry


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """An infer request body: a JSON document, followed (binary-data extension) by its tensors' bytes."""
    binary = memoryview(b"")
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise invalid(f"{HEADER_LENGTH} is {header_length!r}, the body has {len(body)} bytes")
        binary = memoryview(body)[int(header_length):]
        body = body[:int(header_length)]
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise invalid(f"the request is not valid JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list) or not document["inputs"]:
        raise invalid("an infer request is a JSON object with a non-empty 'inputs' list")
    parameters = _parameters(document, "the request")
    method = parameters.get(METHOD_PARAMETER)
    if method is not None and not isinstance(method, str):
        raise invalid(f"parameter 'method' must be a string, got {method!r}")
    inputs, used = _inputs(document["inputs"], binary)
    if used != len(binary):
        raise invalid(f"the inputs' binary_data_size add up to {used} bytes, {len(binary)} follow the JSON")
    return InferRequest(document.get("id"), method, _timeout(parameters.get("timeout")), inputs,
                        _requested_outputs(document.get("outputs")), bool(parameters.get("binary_data_output")))


def _parameters(document: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise invalid(f"'parameters' of {what} must be an object")
    return parameters


def _inputs(tensors: list[Any], binary: memoryview) -> tuple[Instance, int]:
    inputs: Instance = {}
    offset = 0
    for tensor in tensors:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise invalid("each input is an object with a 'name'")
        name = tensor["name"]
        if name in inputs:
            raise invalid(f"input {name!r} is given twice")
        size = _parameters(tensor, f"input {name!r}").get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise invalid(f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary)} binary "
                              f"bytes after offset {offset}")
            raw = binary[offset:offset + size]
            offset += size
        inputs[name] = oip_input(name, tensor.get("datatype"), tensor.get("shape"), tensor.get("data"), raw)
    return inputs, offset


def _timeout(microseconds: Any) -> float | None:
    if microseconds is None:
        return None
    if not isinstance(microseconds, int) or isinstance(microseconds, bool) or microseconds <= 0:
        raise invalid(f"parameter 'timeout' is in microseconds and positive, got {microseconds!r}")
    return microseconds / 1e6


def _requested_outputs(outputs: Any) -> list[tuple[str, bool]] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise invalid("'outputs' is a list of objects with a 'name'")
    return [(o["name"], bool(_parameters(o, f"output {o['name']!r}").get("binary_data"))) for o in outputs]


def infer_response(model_name: str, version: int, request: InferRequest, outputs: Instance) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON part when tensors' bytes follow it (binary-data extension)."""
    selected = request.outputs or [(name, request.binary_outputs) for name in outputs]
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in selected:
        if name not in outputs:
            raise invalid(f"output {name!r} was requested; the method's outputs are {list(outputs)}")
        value = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": oip_datatype(value), "shape": oip_shape(value)}
        data = None if binary else oip_json_data(value)
        if data is None:
            raw = oip_binary_data(value)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if version:
        document["model_version"] = str(version)
    if request.id is not None:
        document["id"] = request.id
    head = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})
