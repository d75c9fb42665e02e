"""MindSpore Serving's client-facing server calls: `start_grpc_server(address)` and `start_restful_server(address)`.

In zmserve the broker routes requests and a gateway speaks gRPC and HTTP to clients in front of it. So each call
starts a gateway (on a thread of this process, like every service of the Python API) on that address, in front of
this process's broker; when the script started none (`start_broker`), the first call starts one where this
process's worker connects (`start_servable`'s `broker_address`, by default 127.0.0.1:5501), with its clients'
address on a free loopback port: a script written for MindSpore Serving then runs with only its imports changed,
its clients on its ports (gRPC 5500, RESTful 1500).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from zmserve.endpoints import DEFAULT_BROKER_WORKER_ADDRESS
from zmserve.server.running import run_in_background
from zmserve.transport import free_port

__all__ = ["SSLConfig", "broker_started", "start_grpc_server", "start_restful_server", "worker_started"]

_lock = threading.Lock()
_broker_address: str | None = None
"""The client address of the broker this process started, if any."""
_worker_broker = DEFAULT_BROKER_WORKER_ADDRESS
"""Where this process's worker (`start_servable`) looks for its broker."""


@dataclass(frozen=True)
class SSLConfig:
    """As MindSpore Serving's `server.SSLConfig`: the server's certificate chain and key (PEM files). Client
    certificates (`custom_ca`, `verify_client`) are not supported."""

    certificate: str
    private_key: str
    custom_ca: str | None = None
    verify_client: bool = False

    def __post_init__(self) -> None:
        if self.custom_ca is not None or self.verify_client:
            raise RuntimeError("zmserve's gateway does not verify client certificates: leave custom_ca and "
                               "verify_client unset")


def broker_started(client_address: str) -> None:
    """`start_broker` tells where this process's broker listens for clients."""
    global _broker_address
    with _lock:
        _broker_address = client_address


def worker_started(broker_address: str) -> None:
    """`start_servable` tells where its worker connects, so a broker started here listens there."""
    global _worker_broker
    with _lock:
        _worker_broker = broker_address


def _broker() -> str:
    """This process's broker's client address; a new broker on a free loopback port when there is none."""
    global _broker_address
    with _lock:
        if _broker_address is None:
            from zmserve_services.broker.broker import Broker

            address = f"tcp://127.0.0.1:{free_port()}"
            run_in_background("broker", Broker(address, _worker_broker))
            _broker_address = address
        return _broker_address


def start_grpc_server(address: str, max_msg_mb_size: int = 100, ssl_config: SSLConfig | None = None) -> None:
    """Answer gRPC on `address` (host:port): MindSpore Serving's `MSService/Predict`, which its client calls, and
    the Open Inference Protocol's `GRPCInferenceService` (tritonclient.grpc)."""
    _start_gateway("grpc", None, address, max_msg_mb_size, ssl_config)


def start_restful_server(address: str, max_msg_mb_size: int = 100, ssl_config: SSLConfig | None = None) -> None:
    """Answer HTTP on `address` (host:port): MindSpore Serving's RESTful scheme and the Open Inference Protocol."""
    _start_gateway("restful", address, None, max_msg_mb_size, ssl_config)


def _start_gateway(name: str, bind: str | None, grpc_bind: str | None, max_msg_mb_size: int,
                   ssl_config: SSLConfig | None) -> None:
    from zmserve_services.gateway.app import Gateway
    from zmserve_services.gateway.auth import TlsFiles
    from zmserve_services.gateway.config import GatewayConfig

    if not isinstance(max_msg_mb_size, int) or not 1 <= max_msg_mb_size <= 512:
        raise RuntimeError(f"max_msg_mb_size must be an int in [1, 512], got {max_msg_mb_size!r}")
    tls = TlsFiles(ssl_config.certificate, ssl_config.private_key) if ssl_config is not None else None
    config = GatewayConfig(bind=bind, grpc_bind=grpc_bind, broker=_broker(), max_body_bytes=max_msg_mb_size * 2**20,
                           tls=tls)
    run_in_background(f"{name}-gateway", Gateway(config))
