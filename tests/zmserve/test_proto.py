"""The committed gRPC stubs are what grpcio-tools makes of the committed .proto files today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ["zmserve/proto/ms_service.proto", "zmserve/proto/grpc_predict_v2.proto"]


def test_the_oip_messages_live_beside_tritonclients_own() -> None:
    """tritonclient.grpc registers KServe's inference.* messages; zmserve's copy is zmserve.oip.*, so one process
    imports both."""
    pytest.importorskip("tritonclient.grpc")
    import tritonclient.grpc  # noqa: F401

    from zmserve.proto import grpc_predict_v2_pb2

    assert grpc_predict_v2_pb2.ModelInferRequest.DESCRIPTOR.full_name == "zmserve.oip.ModelInferRequest"


def test_generated_stubs_match_the_proto_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    for proto in PROTOS:
        (tmp_path / proto).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / proto, tmp_path / proto)
    protoc = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=."]
    subprocess.run([*protoc, "--grpc_python_out=.", PROTOS[0]], cwd=tmp_path, check=True)
    subprocess.run([*protoc, PROTOS[1]], cwd=tmp_path, check=True)  # the server registers this service itself
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "zmserve/proto").glob("*_pb2*"))
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "zmserve/proto").glob("*_pb2*"))
    assert generated == committed
    for path in generated:
        assert (tmp_path / path).read_text() == (ROOT / path).read_text(), f"{path} is stale: regenerate it " \
            "(zmserve/proto/__init__.py says how)"
