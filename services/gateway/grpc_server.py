"""The gateway's gRPC server (`--grpc-bind`): grpcio's asyncio server on the gateway's own loop, sharing its
BrokerLink with HTTP, answering MindSpore Serving's `MSService` (ms_grpc) and the Open Inference Protocol's
`GRPCInferenceService` (oip_grpc) on one port.

The same bounds and security as HTTP: messages up to `--max-body-mb` (MindSpore Serving's `max_msg_mb_size`,
100 MB by default; replies up to 512 MB, its client's limit), TLS with `--certfile`/`--keyfile`, and with
`--auth-token-file` every call must carry the metadata `authorization: Bearer <token>` (else UNAUTHENTICATED).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from zmserve.endpoints import endpoint_host_port
from zmserve.logs import get_logger
from zmserve.security import is_local_address
from zmserve_services.gateway.auth import BearerToken
from zmserve_services.gateway.broker_link import BrokerLink
from zmserve_services.gateway.config import GatewayConfig
from zmserve_services.gateway.ms_grpc import MsServingService
from zmserve_services.gateway.oip_grpc import OipService

log = get_logger("gateway")

MAX_SEND_BYTES = 512 * 2**20
"""MindSpore Serving's client accepts replies up to 512 MB."""


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuse every call without the gateway's bearer token, before its request is read."""

    def __init__(self, token: bytes) -> None:
        self.token = BearerToken(token)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        headers = [(key.encode(), value.encode() if isinstance(value, str) else value)
                   for key, value in details.invocation_metadata or ()]
        if self.token.allows(headers):
            return await continuation(details)
        log.info("request_failed", protocol="grpc", method=details.method, code="UNAUTHENTICATED")
        return grpc.unary_unary_rpc_method_handler(refuse)


async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "this gateway needs the metadata 'authorization: Bearer <token>' (its --auth-token-file)")


async def start_grpc(link: BrokerLink, config: GatewayConfig) -> tuple[grpc.aio.Server, str]:
    """Bind `config.grpc_bind` and start serving; the server and the address it listens on (port 0 = a free one)."""
    assert config.grpc_bind is not None
    interceptors = [TokenCheck(config.auth_token)] if config.auth_token is not None else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", config.max_body_bytes),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ("grpc.so_reuseport", 0),  # a taken port must fail, not be shared with another process
    ])
    server.add_generic_rpc_handlers((MsServingService(link, config.request_timeout).handler(),
                                     OipService(link, config.request_timeout).handler()))
    host, port = endpoint_host_port(config.grpc_bind)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if config.tls is None:
            bound = server.add_insecure_port(target)
        else:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls.keyfile).read_bytes(), Path(config.tls.certfile).read_bytes())])
            bound = server.add_secure_port(target, credentials)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {config.grpc_bind} (gRPC): {error}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {config.grpc_bind} (gRPC)")
    await server.start()
    if config.tls is None and not is_local_address(config.grpc_bind):
        log.warning("plaintext_on_network", address=config.grpc_bind, domain="grpc",
                    how="calls, their tensors and any bearer token cross the network in clear: serve TLS with "
                        "--certfile and --keyfile (docs/SECURITY.md), or bind 127.0.0.1")
    return server, f"{host}:{bound}"
