"""The gateway's gRPC security, in this process (ServerLive needs no broker): TLS with the HTTP certificate, the
bearer token as call metadata, and a gRPC-only gateway (no `--bind`) that stops when asked."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.services.gateway.gateway_client import self_signed_certificate
from zmserve.proto import grpc_predict_v2_pb2 as pb
from zmserve_services.gateway.app import Gateway
from zmserve_services.gateway.auth import http_security
from zmserve_services.gateway.config import GatewayConfig

TOKEN = b"grpc-token"


def server_live(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                               request_serializer=pb.ServerLiveRequest.SerializeToString,
                               response_deserializer=pb.ServerLiveResponse.FromString)


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
            call = server_live(channel)
            live = call(pb.ServerLiveRequest(), metadata=[("authorization", f"Bearer {TOKEN.decode()}")],
                                   timeout=10)
            assert live.live
            for metadata in ([], [("authorization", "Bearer wrong")]):
                with pytest.raises(grpc.RpcError) as caught:
                    call(pb.ServerLiveRequest(), metadata=metadata, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(gateway.grpc_address) as plain, pytest.raises(grpc.RpcError) as caught:
            server_live(plain)(pb.ServerLiveRequest(), timeout=3)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        gateway.stop()
        thread.join(15)
    assert not thread.is_alive()
