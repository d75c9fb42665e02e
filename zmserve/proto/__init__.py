"""Interface definitions of the gRPC services zmserve answers, and their Python stubs.

- `ms_service.proto`: MindSpore Serving's `mindspore.serving.proto.MSService` (its client's one RPC, `Predict`),
  taken unchanged from mindspore-ai/serving (Apache 2.0, its header kept).
- `grpc_predict_v2.proto`: the Open Inference Protocol's `inference.GRPCInferenceService` (KServe v2; Apache 2.0),
  its messages in package `zmserve.oip` (the file says why); the server registers the service's wire name itself.

The `*_pb2.py`, `*_pb2.pyi` and `ms_service_pb2_grpc.py` files are generated and committed, so neither an install
nor a run needs protoc; `tests/zmserve/test_proto.py` fails when they no longer match the .proto files.
Regenerate from the repository's root with grpcio-tools (the dev extra):

    .venv/bin/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \\
        zmserve/proto/ms_service.proto
    .venv/bin/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. zmserve/proto/grpc_predict_v2.proto

The generated code checks its runtime: protobuf and grpcio at least the versions that generated it (pyproject).
"""
