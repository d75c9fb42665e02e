"""MindSpore Serving's gRPC service, `mindspore.serving.proto.MSService/Predict`, answered through the broker.

A client written for MindSpore Serving (`mindspore_serving.client.Client`, or any stub of ms_service.proto) calls
this unchanged: same service, same messages (zmserve/proto/ms_service.proto), same place for errors. As in
MindSpore Serving, a failure is not a gRPC status but the reply's `error_msg` list: one entry when the whole
request failed (or every instance failed the same way), one per instance otherwise (code 0 where an instance was
answered). The gRPC status is OK in both cases, because MindSpore Serving's client reads errors only from there;
zmserve's own code (INVALID_ARGUMENT, NOT_FOUND, ...) rides along in the trailing metadata `zmserve-code`.

Each instance is its own broker request, sent together and awaited together, exactly as the REST scheme does
(services/gateway/ms_rest.py): same deadlines, codes, batching and replicas as every other way in. The deadline is
the gRPC call's own when it sets one shorter than `--timeout`; a call the client cancels cancels its broker
requests (BrokerLink sends CANCEL).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import grpc
import numpy as np

from zmserve.codec import Instance, Value
from zmserve.logs import get_logger
from zmserve.proto import ms_service_pb2 as pb
from zmserve.protocol import ErrorCode, ServingError
from zmserve_services.gateway.broker_link import BrokerLink
from zmserve_services.gateway.values import invalid, raw_tensor

log = get_logger("gateway")

SERVICE = "mindspore.serving.proto.MSService"
CODE_METADATA = "zmserve-code"
"""Trailing metadata that carries zmserve's error code of a failed request (the first failure's)."""

DTYPES: dict[int, str] = {
    pb.MS_BOOL: "bool", pb.MS_INT8: "int8", pb.MS_UINT8: "uint8", pb.MS_INT16: "int16", pb.MS_UINT16: "uint16",
    pb.MS_INT32: "int32", pb.MS_UINT32: "uint32", pb.MS_INT64: "int64", pb.MS_UINT64: "uint64",
    pb.MS_FLOAT16: "float16", pb.MS_FLOAT32: "float32", pb.MS_FLOAT64: "float64",
}
"""Proto dtype -> numpy dtype name; MS_STRING and MS_BYTES carry one str or bytes value in `bytes_val`."""
PROTO_DTYPES = {name: proto for proto, name in DTYPES.items()}

STATUS_CODES: dict[str, int] = {
    ErrorCode.INVALID_ARGUMENT: 2,  # MindSpore Serving's INVALID_INPUTS
    ErrorCode.INTERNAL: 3,  # SYSTEM_ERROR
    ErrorCode.UNAVAILABLE: 5,  # SERVABLE_UNAVAILABLE
}
"""zmserve code -> MindSpore Serving's StatusCode (status.h) in `ErrorMsg.error_code`; the rest are FAILED (1).
Its client only tells 0 (answered) from the rest."""
FAILED = 1


def status_code(code: str) -> int:
    return STATUS_CODES.get(code, FAILED)


# ---- values ----------------------------------------------------------------------------------------------------
def input_value(name: str, tensor: pb.Tensor) -> Value:
    """One request tensor as a zmserve value, checked as MindSpore Serving checks it (CheckRequestTensor), with its
    message: `Instances input x check failed, detail: ...`."""
    try:
        return _tensor_value(tensor)
    except ServingError as error:
        raise invalid(f"Instances input {name} check failed, detail: {error.message}") from None


def _tensor_value(tensor: pb.Tensor) -> Value:
    dims = list(tensor.shape.dims)
    if tensor.dtype in (pb.MS_STRING, pb.MS_BYTES):
        if len(tensor.bytes_val) != 1:
            raise invalid("Instance tensor check failed: bytes or string type shape batch size can only be 1")
        if dims not in ([], [1]):
            raise invalid("Instance tensor check failed: bytes or string type input  shape can only be (1,) or "
                          f"empty, but given shape is {dims}")
        raw = tensor.bytes_val[0]
        if tensor.dtype == pb.MS_BYTES:
            return raw
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise invalid("an MS_STRING value must be UTF-8 (use MS_BYTES for raw bytes)") from None
    if tensor.WhichOneof("tensor_data") == "shm_data":
        raise invalid("Tensor check failed: shared-memory tensors (shm_data) are not supported by zmserve; "
                      "send the data in 'data'")
    after_zero = False
    for dim in dims:
        if dim < 0 or after_zero:
            raise invalid(f"Tensor check failed: input  shape {dims} invalid")
        after_zero = dim == 0
    kind = DTYPES.get(tensor.dtype)
    if kind is None:
        raise invalid(f"Tensor check failed: input data type {tensor.dtype} invalid")
    if len(tensor.data) != math.prod(dims) * np.dtype(kind).itemsize:
        raise invalid(f"Tensor check failed: input data size {len(tensor.data)} invalid")
    return raw_tensor(tensor.data, kind, dims)


def output_tensor(value: Value, tensor: pb.Tensor) -> None:
    """Fill `tensor` (an entry of a reply instance's map) with one zmserve output, as MindSpore Serving writes it."""
    if isinstance(value, str):
        tensor.dtype = pb.MS_STRING
        tensor.bytes_val.append(value.encode())
        return
    if isinstance(value, bytes | bytearray | memoryview):
        tensor.dtype = pb.MS_BYTES
        tensor.bytes_val.append(bytes(value))
        return
    array = np.asarray(value)
    proto_dtype = PROTO_DTYPES.get(array.dtype.name)
    if proto_dtype is None:
        raise ServingError(ErrorCode.INTERNAL, f"an output of dtype {array.dtype} has no MindSpore Serving dtype")
    tensor.dtype = proto_dtype
    tensor.shape.dims.extend(array.shape)
    tensor.data = array.tobytes()  # row-major, little-endian on every machine zmserve runs on


def request_instances(request: pb.PredictRequest) -> list[Instance]:
    """The request's instances, each a dict of input name -> zmserve value."""
    spec = request.servable_spec
    if not request.instances:
        raise invalid(f"Instances count of request cannot be 0, servable: {spec.name}, method: {spec.method_name}")
    instances = []
    for proto_instance in request.instances:
        if proto_instance.output_buffers:
            raise invalid("output_buffers (shared-memory outputs) are not supported by zmserve")
        instances.append({name: input_value(name, proto_instance.items[name])
                          for name in sorted(proto_instance.items)})
    return instances


# ---- replies ---------------------------------------------------------------------------------------------------
def reply(spec: pb.ServableSpec, outcomes: list[Instance | ServingError]) -> pb.PredictReply:
    """The reply for every instance's outcome. As MindSpore Serving: no error -> instances only; every instance
    failed the same way (or the one instance failed) -> one ErrorMsg and no instances; otherwise one ErrorMsg per
    instance (code 0 and no message where it was answered) beside an instance per instance (empty where failed)."""
    answer = pb.PredictReply()
    answer.servable_spec.CopyFrom(spec)
    errors = [outcome for outcome in outcomes if isinstance(outcome, ServingError)]
    if errors and all(isinstance(o, ServingError) and (o.code, o.message) == (errors[0].code, errors[0].message)
                      for o in outcomes):
        answer.error_msg.append(error_msg(errors[0]))
        return answer
    for outcome in outcomes:
        instance = answer.instances.add()
        if isinstance(outcome, ServingError):
            answer.error_msg.append(error_msg(outcome))
            continue
        for name, value in outcome.items():
            output_tensor(value, instance.items[name])
        if errors:
            answer.error_msg.add(error_code=0)
    return answer


def error_reply(spec: pb.ServableSpec, error: ServingError) -> pb.PredictReply:
    answer = pb.PredictReply(error_msg=[error_msg(error)])
    answer.servable_spec.CopyFrom(spec)
    return answer


def error_msg(error: ServingError) -> pb.ErrorMsg:
    return pb.ErrorMsg(error_code=status_code(error.code), error_msg=error.message.encode())


# ---- the service -----------------------------------------------------------------------------------------------
class MsServingService:
    """`Predict`: the request's instances become broker requests; their outcomes become one PredictReply."""

    def __init__(self, link: BrokerLink, request_timeout: float) -> None:
        self.link = link
        self.request_timeout = request_timeout

    async def predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictReply:
        spec = request.servable_spec
        try:
            instances = request_instances(request)
            timeout = call_timeout(context, self.request_timeout)
            if len(instances) == 1:
                outcomes = [await self.infer_one(spec, instances[0], timeout)]
            else:
                outcomes = list(await asyncio.gather(*(self.infer_one(spec, i, timeout) for i in instances)))
        except ServingError as error:
            log_failure(spec, error)
            context.set_trailing_metadata(((CODE_METADATA, error.code),))
            return error_reply(spec, error)
        failures = [o for o in outcomes if isinstance(o, ServingError)]
        if failures:
            log_failure(spec, failures[0], failed=len(failures), instances=len(outcomes))
            context.set_trailing_metadata(((CODE_METADATA, failures[0].code),))
        return reply(spec, outcomes)

    async def infer_one(self, spec: pb.ServableSpec, instance: Instance, timeout: float) -> Instance | ServingError:
        try:
            outputs = await self.link.infer(spec.name, spec.method_name, spec.version_number, [instance], timeout)
        except ServingError as error:
            return error
        return outputs[0]

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Predict": grpc.unary_unary_rpc_method_handler(
                self.predict, request_deserializer=pb.PredictRequest.FromString,
                response_serializer=pb.PredictReply.SerializeToString),
        })


def call_timeout(context: grpc.aio.ServicerContext, default: float) -> float:
    """The call's own deadline when it is shorter than the gateway's `--timeout`."""
    remaining: Any = context.time_remaining()
    if remaining is None:
        return default
    if remaining <= 0:
        raise ServingError(ErrorCode.DEADLINE_EXCEEDED, "the call's deadline passed before it reached the broker")
    return min(default, remaining)


def log_failure(spec: pb.ServableSpec, error: ServingError, **fields: Any) -> None:
    log.info("request_failed", protocol="ms_grpc", servable=spec.name, method=spec.method_name, code=error.code,
             message=error.message, **fields)
