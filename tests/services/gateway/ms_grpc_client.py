"""A MindSpore Serving gRPC client built on zmserve's stubs of the same proto (zmserve/proto/ms_service.proto), for
the tests that run where MindSpore Serving's own client is not installed.

It puts values on the wire as `mindspore_serving.client.Client` 2.0.2 does (a numpy array or number as its dtype,
shape and bytes; a Python int, float or bool as a one-element array of numpy's default dtype; str as MS_STRING and
bytes as MS_BYTES, shape [1]) and reads a reply as its `infer` does: `{"error": message}` for a request that
failed as a whole, otherwise one dict per instance, `{"error": message}` in place of a failed one.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from zmserve.proto import ms_service_pb2 as pb
from zmserve.proto import ms_service_pb2_grpc as pb_grpc

DTYPES = {
    "bool": pb.MS_BOOL, "int8": pb.MS_INT8, "uint8": pb.MS_UINT8, "int16": pb.MS_INT16, "uint16": pb.MS_UINT16,
    "int32": pb.MS_INT32, "uint32": pb.MS_UINT32, "int64": pb.MS_INT64, "uint64": pb.MS_UINT64,
    "float16": pb.MS_FLOAT16, "float32": pb.MS_FLOAT32, "float64": pb.MS_FLOAT64,
}
NUMPY = {proto: name for name, proto in DTYPES.items()}
MAX_MESSAGE = 512 * 2**20


def put(value: Any, tensor: pb.Tensor) -> None:
    if isinstance(value, str | bytes):
        tensor.dtype = pb.MS_STRING if isinstance(value, str) else pb.MS_BYTES
        tensor.shape.dims.append(1)
        tensor.bytes_val.append(value.encode() if isinstance(value, str) else value)
        return
    array = value if isinstance(value, np.ndarray | np.generic) else np.array((value,))
    tensor.dtype = DTYPES[np.asarray(array).dtype.name]
    tensor.shape.dims.extend(np.shape(array))
    tensor.data = np.asarray(array).tobytes()


def request(servable: str, method: str, version: int, instances: Any) -> pb.PredictRequest:
    message = pb.PredictRequest()
    message.servable_spec.name = servable
    message.servable_spec.method_name = method
    message.servable_spec.version_number = version
    for item in instances if isinstance(instances, list | tuple) else (instances,):
        instance = message.instances.add()
        for name, value in item.items():
            put(value, instance.items[name])
    return message


def value_of(tensor: pb.Tensor) -> Any:
    if tensor.dtype in (pb.MS_STRING, pb.MS_BYTES):
        values = [item.decode() if tensor.dtype == pb.MS_STRING else item for item in tensor.bytes_val]
        return values[0] if len(values) == 1 else values
    return np.frombuffer(tensor.data, NUMPY[tensor.dtype]).reshape(tensor.shape.dims)


def parse(reply: pb.PredictReply) -> Any:
    errors = reply.error_msg
    if len(errors) == 1 and errors[0].error_code != 0:
        return {"error": errors[0].error_msg.decode()}
    assert len(errors) in (0, len(reply.instances)), reply
    return [{"error": errors[i].error_msg.decode()} if errors and errors[i].error_code != 0
            else {name: value_of(tensor) for name, tensor in instance.items.items()}
            for i, instance in enumerate(reply.instances)]


class MsClient:
    """`Client(address, servable, method, version).infer(instances)`, as MindSpore Serving's."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        self.channel = (grpc.insecure_channel(address, options=options) if credentials is None
                        else grpc.secure_channel(address, credentials, options=options))
        self.stub = pb_grpc.MSServiceStub(self.channel)

    def predict(self, servable: str, method: str, instances: Any, version: int = 0, **call: Any) -> pb.PredictReply:
        return self.stub.Predict(request(servable, method, version, instances), **call)

    def infer(self, servable: str, method: str, instances: Any, version: int = 0, **call: Any) -> Any:
        return parse(self.predict(servable, method, instances, version, **call))

    def close(self) -> None:
        self.channel.close()
