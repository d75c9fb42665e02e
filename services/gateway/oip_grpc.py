"""The Open Inference Protocol over gRPC (KServe v2 `inference.GRPCInferenceService`, what `tritonclient.grpc` and
KServe tooling call): ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer.

The same model as the HTTP OIP (services/gateway/oip.py), whose choices this reuses: a model is a servable, its
versions the servable's, an infer request one instance, the method the servable's first unless the request
parameter `method` names another; tensors go through the same conversions (values.oip_input: typed `contents` as
JSON `data` is, `raw_input_contents` as the binary-data extension's bytes; outputs as raw_output_contents, as
Triton answers). A failure is a gRPC status: zmserve's code under its gRPC name, with zmserve's message.
"""

from __future__ import annotations

from typing import Any

import grpc

import zmserve
from zmserve.codec import Instance
from zmserve.logs import get_logger
from zmserve.proto import grpc_predict_v2_pb2 as pb
from zmserve.protocol import ErrorCode, ServingError
from zmserve_services.gateway import oip
from zmserve_services.gateway.broker_link import BrokerLink, TensorSpec
from zmserve_services.gateway.ms_grpc import call_timeout
from zmserve_services.gateway.values import (
    BYTES_LENGTH,
    OIP_NAME_OF_DTYPE,
    invalid,
    oip_binary_data,
    oip_datatype,
    oip_input,
    oip_shape,
)

log = get_logger("gateway")

SERVICE = "inference.GRPCInferenceService"
METADATA_TIMEOUT_S = 2.0
"""How long a ready or metadata answer waits for the broker (as on HTTP)."""
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
"""Which InferTensorContents field holds each datatype (FP16 has none: raw_input_contents only)."""
GRPC_STATUS: dict[str, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
}
"""zmserve code -> gRPC status; the rest (INTERNAL, UNAUTHENTICATED: the gateway's own keys) are INTERNAL."""


def grpc_status(code: str) -> grpc.StatusCode:
    return GRPC_STATUS.get(code, grpc.StatusCode.INTERNAL)


def parameter(parameters: Any, name: str) -> Any:
    """A request parameter's value (whichever of its oneof is set), or None."""
    if name not in parameters:
        return None
    entry = parameters[name]
    choice = entry.WhichOneof("parameter_choice")
    return getattr(entry, choice) if choice else None


def infer_inputs(request: pb.ModelInferRequest) -> Instance:
    """The request's input tensors as one zmserve instance: from raw_input_contents (every input, in order) or from
    each input's typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs: Instance = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise invalid(f"input {tensor.name!r} is given twice")
        shape = list(tensor.shape)
        if raw:
            inputs[tensor.name] = oip_input(tensor.name, tensor.datatype, shape, raw=memoryview(raw[index]))
            continue
        field = CONTENTS_FIELD.get(tensor.datatype)
        if field is None:
            if tensor.datatype == "FP16":
                raise invalid(f"input {tensor.name!r}: FP16 has no typed contents; send it in raw_input_contents")
            inputs[tensor.name] = oip_input(tensor.name, tensor.datatype, shape)  # refuses the datatype
            continue
        contents = getattr(tensor.contents, field)
        if field == "bytes_contents":  # one element in zmserve: its bytes, length-prefixed as raw BYTES are
            data = memoryview(b"".join(BYTES_LENGTH.pack(len(item)) + item for item in contents))
            inputs[tensor.name] = oip_input(tensor.name, tensor.datatype, shape, raw=data)
        else:
            inputs[tensor.name] = oip_input(tensor.name, tensor.datatype, shape, data=list(contents))
    if not inputs:
        raise invalid("an infer request has at least one input")
    return inputs


def infer_response(request: pb.ModelInferRequest, outputs: Instance) -> pb.ModelInferResponse:
    """Every output (or those the request names), each as raw_output_contents."""
    names = [output.name for output in request.outputs] or list(outputs)
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                     id=request.id)
    for name in names:
        if name not in outputs:
            raise invalid(f"output {name!r} was requested; the method's outputs are {list(outputs)}")
        value = outputs[name]
        response.outputs.add(name=name, datatype=oip_datatype(value), shape=oip_shape(value))
        response.raw_output_contents.append(oip_binary_data(value))
    return response


def tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    """Name always; datatype and shape when the worker reported them (empty otherwise)."""
    entry = pb.ModelMetadataResponse.TensorMetadata(name=spec.name)
    if spec.dtype is not None and spec.dtype in OIP_NAME_OF_DTYPE:
        entry.datatype = OIP_NAME_OF_DTYPE[spec.dtype]
    if spec.shape is not None:
        entry.shape.extend(spec.shape)
    return entry


class OipService:
    def __init__(self, link: BrokerLink, request_timeout: float) -> None:
        self.link = link
        self.request_timeout = request_timeout

    async def server_live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        served = await self.answer(context, self.link.served(None, METADATA_TIMEOUT_S))
        return pb.ServerReadyResponse(ready=any(v.ready for v in served.versions))

    async def server_metadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=oip.SERVER_NAME, version=zmserve.__version__,
                                         extensions=oip.EXTENSIONS)

    async def model_ready(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        chosen = await self.answer(context, self.choose(request.name, request.version))
        return pb.ModelReadyResponse(ready=chosen.ready)

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        async def metadata() -> pb.ModelMetadataResponse:
            served = await self.link.served(request.name, METADATA_TIMEOUT_S)
            chosen = oip.choose(served, request.name, oip.parse_version(request.version or None))
            signature = chosen.signatures.get(oip.choose_method(chosen, None))
            return pb.ModelMetadataResponse(
                name=request.name, platform=oip.PLATFORM,
                versions=[str(v.version) for v in sorted(served.versions, key=lambda v: v.version)
                          if v.servable == request.name],
                inputs=[tensor_metadata(s) for s in signature.inputs] if signature else [],
                outputs=[tensor_metadata(s) for s in signature.outputs] if signature else [])
        return await self.answer(context, metadata())

    async def model_infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        async def infer() -> pb.ModelInferResponse:
            version = oip.parse_version(request.model_version or None)
            method = parameter(request.parameters, oip.METHOD_PARAMETER)
            if method is not None and not isinstance(method, str):
                raise invalid(f"parameter 'method' must be a string, got {method!r}")
            inputs = infer_inputs(request)
            timeout = call_timeout(context, self.request_timeout)
            microseconds = parameter(request.parameters, "timeout")
            if microseconds:
                timeout = min(timeout, microseconds / 1e6)
            if method is None:
                method = oip.choose_method(await self.choose(request.model_name, request.model_version), None)
            outputs = await self.link.infer(request.model_name, method, version, [inputs], timeout)
            return infer_response(request, outputs[0])
        return await self.answer(context, infer())

    async def choose(self, name: str, version: str) -> oip.ServableVersion:
        served = await self.link.served(name, METADATA_TIMEOUT_S)
        return oip.choose(served, name, oip.parse_version(version or None))

    async def answer(self, context: Any, work: Any) -> Any:
        """The result of `work`, or the call aborted with its ServingError's status and message."""
        try:
            return await work
        except ServingError as error:
            log.info("request_failed", protocol="oip_grpc", code=error.code, message=error.message)
            await context.abort(grpc_status(error.code), error.message)

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(call: Any, request_type: Any, response_type: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(call, request_deserializer=request_type.FromString,
                                                       response_serializer=response_type.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE, {
            "ServerLive": unary(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": unary(self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        })
