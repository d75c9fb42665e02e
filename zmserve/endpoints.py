"""Where zmserve's processes listen by default, and how an address is written (`host:port` or a ZeroMQ
endpoint): every command, the Python API and each service's settings read these."""

from __future__ import annotations

DEFAULT_BROKER_CLIENT_ADDRESS = "tcp://127.0.0.1:5500"
DEFAULT_BROKER_WORKER_ADDRESS = "tcp://127.0.0.1:5501"
DEFAULT_DISTRIBUTED_ADDRESS = "127.0.0.1:6200"
DEFAULT_AGENT_START_PORT = 7000


def normalize_address(address: str) -> str:
    """Accept `host:port`, `localhost:port` or `tcp://host:port` and return a ZeroMQ endpoint."""
    if "://" in address:
        return address
    return f"tcp://{address}"


def endpoint_host_port(address: str) -> tuple[str, int]:
    """Split `tcp://host:port` (or `host:port`) into its parts."""
    endpoint = normalize_address(address)
    host_port = endpoint.split("://", 1)[1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host, int(port)
