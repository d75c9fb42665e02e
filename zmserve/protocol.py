"""The zmserve wire protocol: every message type, command frame, error code and default lives here.

Nothing else in the code base spells a message type or an error code literally; both sides of every link import
these names. `docs/PROTOCOL.md` describes the frames each link carries.
"""

from __future__ import annotations

from enum import StrEnum

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; a message with another version is answered INVALID_ARGUMENT."""


class MessageType(StrEnum):
    """The `type` field of every msgpack header."""

    # client -> broker -> worker, and back
    REQUEST = "request"
    REPLY = "reply"
    ERROR = "error"
    # worker <-> broker (control). A worker repeats its status every heartbeat interval, so a restarted broker
    # learns every worker again within one interval.
    WORKER_STATUS = "worker_status"
    WORKER_DISCONNECT = "worker_disconnect"
    HEARTBEAT = "heartbeat"
    # agent <-> worker (control)
    AGENT_REGISTER = "agent_register"
    AGENT_CONFIGURE = "agent_configure"
    AGENT_READY = "agent_ready"
    AGENT_FAILED = "agent_failed"
    AGENT_REJECTED = "agent_rejected"
    AGENT_SHUTDOWN = "agent_shutdown"
    # agent launcher <-> worker: which ranks does this machine hold?
    RANK_TABLE_QUERY = "rank_table_query"
    RANK_TABLE = "rank_table"
    # worker -> stage 0 -> ... -> last stage -> worker (data plane)
    MODEL_CALL = "model_call"
    MODEL_RESULT = "model_result"
    MODEL_ERROR = "model_error"
    # client -> broker -> client: what is served (the HTTP gateway's health and model-metadata endpoints).
    # Minimal version for the gateway; to be redone on the typed protocol.
    METADATA_QUERY = "metadata_query"
    METADATA = "metadata"


class BrokerCommand:
    """First frame of every message between a worker (DEALER) and the broker's worker-facing ROUTER.

    REQUEST and REPLY carry the client's routing identity in the second frame so the broker never re-encodes a
    header; CONTROL carries a msgpack header only.
    """

    REQUEST = b"\x01"
    REPLY = b"\x02"
    CONTROL = b"\x03"


class ErrorCode(StrEnum):
    """Error codes of a reply; the names follow gRPC's status codes."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"


class ServingError(Exception):
    """An error that becomes an ERROR reply: a code a program can act on and a message a person can read."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode(code)
        self.message = message


# Topics on the PUB sockets that feed a stage. Agents subscribe to MODEL_CALL_TOPIC for work and to
# SUBSCRIBER_TOPIC_PREFIX + rank so the publisher's XPUB sees exactly which ranks are listening.
MODEL_CALL_TOPIC = b"C"
SUBSCRIBER_TOPIC_PREFIX = b"R"

# Defaults shared by every process.
DEFAULT_BROKER_CLIENT_ADDRESS = "tcp://127.0.0.1:5500"
DEFAULT_BROKER_WORKER_ADDRESS = "tcp://127.0.0.1:5501"
DEFAULT_DISTRIBUTED_ADDRESS = "127.0.0.1:6200"
DEFAULT_AGENT_START_PORT = 7000
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 3
ZERO_COPY_THRESHOLD_BYTES = 64 * 1024
"""Tensors at least this big are sent without copying (pyzmq copies small frames anyway)."""
MAX_INFLIGHT_MODEL_CALLS = 64
"""Model calls a worker keeps in flight per servable; the stage PUB sockets have no HWM, so this bound is what
keeps their queues finite and guarantees a publish is never dropped."""
MAX_BATCH_SIZE = 32
"""Instances per model call for servables with a batch dimension (a model exported with a fixed batch size
uses that size instead)."""
MAX_BATCH_DELAY_S = 0.002
"""How long the first instance of a batch may wait for others."""
EXECUTION_TIMEOUT_S = 30.0
"""A pipeline with calls in flight that returns no result for this long is a sick group: its agents restart."""
MAX_QUEUED_REQUESTS = 1024
"""Requests a worker holds (running or waiting) before it answers RESOURCE_EXHAUSTED."""
RECONNECT_MIN_MS = 100
RECONNECT_MAX_MS = 2000
"""Reconnection backoff to a lost peer: 100 ms, doubling up to 2 s."""
MAX_REQUEST_BYTES = 1 << 30
"""Requests larger than this (all frames) are refused by the broker with RESOURCE_EXHAUSTED."""
LINGER_MS = 0
"""Sockets close without waiting for unsent messages: every request is answered before a close, so a message
still queued at close belongs to a peer that is gone."""


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
