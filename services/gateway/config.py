"""The gateway's settings: where it listens, which broker it asks, and the bounds on one HTTP request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from zmserve.endpoints import DEFAULT_BROKER_CLIENT_ADDRESS, endpoint_host_port

if TYPE_CHECKING:
    from zmserve.security import CurveClient
    from zmserve_services.gateway.auth import TlsFiles

DEFAULT_BIND = "127.0.0.1:1500"
"""MindSpore Serving's REST port: a client of it only changes the host."""
DEFAULT_REQUEST_TIMEOUT_S = 60.0
"""Each broker request's deadline unless the request sets its own (OIP `timeout`), as the zmq client's."""
DEFAULT_MAX_BODY_MB = 100
"""MindSpore Serving's REST server default (`max_msg_mb_size`)."""
DEFAULT_BODY_TIMEOUT_S = 30.0
"""A body not complete this long after its request line is answered 408 and its connection closed."""
DEFAULT_KEEP_ALIVE_S = 15.0
"""An idle keep-alive connection is closed after this long."""
METADATA_TTL_S = 1.0
"""How long the gateway reuses the broker's answer about what is served (the default OIP method)."""
GRACEFUL_SHUTDOWN_S = 5.0
"""On SIGTERM, requests in flight get this long to be answered before their connections are closed."""


@dataclass(frozen=True)
class GatewayConfig:
    bind: str | None = DEFAULT_BIND
    """HTTP host:port; None = no HTTP (a gRPC-only gateway, as `zmserve.server.start_grpc_server` starts)."""
    broker: str = DEFAULT_BROKER_CLIENT_ADDRESS
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * 2**20
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_S
    metrics: bool = False
    """Record Prometheus metrics (served on `--metrics-bind` by the CLI)."""
    tls: TlsFiles | None = None
    """HTTPS with this certificate and key (services/gateway/auth.py); None = plain HTTP."""
    auth_token: bytes | None = None
    """Every request must carry `Authorization: Bearer <auth_token>`; None = no token."""
    broker_curve: CurveClient | None = None
    """CURVE on the link to the broker (zmserve/security.py); None = plaintext."""
    grpc_bind: str | None = None
    """gRPC host:port (MindSpore Serving's MSService and the OIP's GRPCInferenceService); None = no gRPC."""

    @property
    def host_port(self) -> tuple[str, int]:
        """`--bind` is host:port (port 0 = any free port)."""
        assert self.bind is not None, "no HTTP"
        return endpoint_host_port(self.bind)
