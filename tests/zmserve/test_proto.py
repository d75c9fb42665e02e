"""The committed gRPC stubs are what grpcio-tools makes of the committed .proto files today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ["zmserve/proto/ms_service.proto", "zmserve/proto/grpc_predict_v2.proto"]


def test_generated_stubs_match_the_proto_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    for proto in PROTOS:
        (tmp_path / proto).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / proto, tmp_path / proto)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", *PROTOS], cwd=tmp_path, check=True)
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "zmserve/proto").glob("*_pb2*"))
    assert len(generated) == 6
    for path in generated:
        assert (tmp_path / path).read_text() == (ROOT / path).read_text(), f"{path} is stale: regenerate it " \
            "(zmserve/proto/__init__.py says how)"
