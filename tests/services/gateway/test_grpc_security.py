"""The gateway's gRPC security, in this process (ServerLive needs no broker): TLS with the HTTP certificate, the
bearer token as call metadata, and a gRPC-only gateway (no `--bind`) that stops when asked."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from gateway_client import self_signed_certificate

from services.gateway.app import Gateway
from services.gateway.auth import http_security
from services.gateway.config import GatewayConfig
from zmserve.proto import grpc_predict_v2_pb2 as pb
from zmserve.proto import grpc_predict_v2_pb2_grpc as pb_grpc

TOKEN = b"grpc-token"


def test_tls_and_the_token_on_a_grpc_only_gateway(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    tls, _ = http_security("127.0.0.1:0", str(cert), str(key), None)
    gateway = Gateway(GatewayConfig(bind=None, grpc_bind="127.0.0.1:0", broker="tcp://127.0.0.1:1", tls=tls,
                                    auth_token=TOKEN))
    thread = threading.Thread(target=gateway.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while gateway.grpc_address is None:
            assert thread.is_alive() and time.monotonic() < deadline, "the gRPC server did not start"
            time.sleep(0.02)
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(gateway.grpc_address, credentials) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            live = stub.ServerLive(pb.ServerLiveRequest(), metadata=[("authorization", f"Bearer {TOKEN.decode()}")],
                                   timeout=10)
            assert live.live
            for metadata in ([], [("authorization", "Bearer wrong")]):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ServerLive(pb.ServerLiveRequest(), metadata=metadata, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(gateway.grpc_address) as plain, pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GRPCInferenceServiceStub(plain).ServerLive(pb.ServerLiveRequest(), timeout=3)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        gateway.stop()
        thread.join(15)
    assert not thread.is_alive()
