"""The zmserve wire protocol: every message type, command frame, error code and default lives here.

Each message is a typed `msgspec.Struct`, encoded as a msgpack map whose `type` key names it and whose `v` key
carries the protocol version. A receiver decodes a header frame once, with `decode(frame, *accepted)`: the
struct's field types are the checks, so a malformed header never reaches service code. Nothing else in the code
base spells a message type or an error code literally. `docs/PROTOCOL.md` describes the frames each link
carries; `tests/zmserve/test_protocol.py` checks it against these types.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any, TypeVar

import msgspec

PROTOCOL_VERSION = 2
"""Bumped on any incompatible change; a message with another version is answered INVALID_ARGUMENT."""

RequestId = int | str


class MessageType(StrEnum):
    """The `type` field of every header."""

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
    # client -> broker -> client: what is served (the HTTP gateway's health and model-metadata endpoints)
    METADATA_QUERY = "metadata_query"
    METADATA = "metadata"


class BrokerCommand:
    """First frame of every message between a worker (DEALER) and the broker's worker-facing ROUTER.

    REQUEST and REPLY carry the client's routing identity in the second frame so the broker never re-encodes a
    header; CONTROL carries a header only.
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
    UNAUTHENTICATED = "UNAUTHENTICATED"
    """The server refused this side's CURVE handshake; raised by the client itself, never sent on the wire."""


class Forward(StrEnum):
    """Where an agent sends a call's output: the stage leader forwards it, every other rank drops it (all ranks
    of a stage hold the same output)."""

    PUBLISH = "publish"  # leader of a stage that is not the last: to the next stage's SUBs
    RESULT = "result"  # leader of the last stage: back to the worker
    NONE = "none"  # any other rank


class ServingError(Exception):
    """An error that becomes an ERROR reply: a code a program can act on and a message a person can read."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode(code)
        self.message = message


# ---- values -------------------------------------------------------------------------------------------------
class TensorSpec(msgspec.Struct, frozen=True):
    """A value's name, dtype and shape. In a message it describes the value frame at the same position
    (`shape` >= 0); in a model signature `-1` means any size."""

    name: str
    dtype: str
    shape: list[int]


class ModelSignature(msgspec.Struct, frozen=True, omit_defaults=True):
    """A shard's inputs and outputs, from the `group_config.json` its export wrote (None when unknown)."""

    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None


class ShardInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a shard's export says it is (its `group_config.json`), so the worker can refuse a shard that does not
    belong to its servable before any group forms. None means the export did not say."""

    rank: int | None = None
    rank_size: int | None = None
    stage: int | None = None
    stage_size: int | None = None
    signature: ModelSignature = ModelSignature()


class ValueSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    """A method's input or output as a client sees it: its name, and its dtype and shape (-1 = any size, no
    batch dimension) when the value goes straight to or comes straight from the model; None when a Python stage
    makes or takes it."""

    name: str
    dtype: str | None = None
    shape: list[int] | None = None


class MethodSignature(msgspec.Struct, frozen=True):
    inputs: list[ValueSpec]
    outputs: list[ValueSpec]


class ServableInfo(msgspec.Struct, frozen=True):
    """One (servable, version) as the broker sees it across its workers (ready when any of them is)."""

    servable: str
    version: int
    methods: list[str]
    ready: bool
    reason: str = ""
    signatures: dict[str, MethodSignature] = {}


# ---- messages -----------------------------------------------------------------------------------------------
class Message(msgspec.Struct, tag_field="type", kw_only=True):
    """Every header: `v` is the protocol version, `type` (the struct's tag) the message type."""

    v: int = PROTOCOL_VERSION


class Request(Message, tag=MessageType.REQUEST.value):
    """client -> broker -> worker. `version` 0 means the newest ready version."""

    id: RequestId
    servable: str
    method: str
    version: int = 0
    timeout_ms: float | None = None
    instances: list[list[TensorSpec]] = []


class Reply(Message, tag=MessageType.REPLY.value):
    """worker -> broker -> client: one list of output specs per input instance."""

    id: RequestId
    instances: list[list[TensorSpec]] = []


class Error(Message, tag=MessageType.ERROR.value):
    """broker or worker -> client. `id` is None only when the request's own id could not be read."""

    id: RequestId | None
    code: ErrorCode
    message: str


class WorkerStatus(Message, tag=MessageType.WORKER_STATUS.value):
    """`methods` in the order the servable declares them (the first is a client's default method);
    `signatures` once the agents have said what the model takes and gives."""

    servable: str
    version: int
    methods: list[str]
    ready: bool
    reason: str = ""
    signatures: dict[str, MethodSignature] = {}


class WorkerDisconnect(Message, tag=MessageType.WORKER_DISCONNECT.value):
    pass


class Heartbeat(Message, tag=MessageType.HEARTBEAT.value):
    rank: int | None = None


class AgentRegister(Message, tag=MessageType.AGENT_REGISTER.value):
    rank: int
    host: str
    pid: int
    model_file: str
    publish_address: str
    replaces_pid: int | None = None
    shard: ShardInfo = ShardInfo()


class AgentConfigure(Message, tag=MessageType.AGENT_CONFIGURE.value):
    stage: int
    stage_size: int
    node_id: int
    group_size: int
    scheduler_host: str
    scheduler_port: int
    input_address: str
    result_address: str
    forward: Forward
    downstream_ranks: list[int] = []
    input_key: str | None = None
    """CURVE: the public key of the publisher at `input_address` when it is a stage leader (None: the worker's,
    which the agent holds already, or plaintext)."""
    downstream_keys: list[str] = []
    """CURVE: for a "publish" leader, the public keys of the next stage's agents, the only ones its XPUB admits."""


class AgentReady(Message, tag=MessageType.AGENT_READY.value):
    rank: int
    load_seconds: float = 0.0


class AgentFailed(Message, tag=MessageType.AGENT_FAILED.value):
    message: str


class AgentRejected(Message, tag=MessageType.AGENT_REJECTED.value):
    message: str
    retry: bool


class AgentShutdown(Message, tag=MessageType.AGENT_SHUTDOWN.value):
    reason: str


class RankTableQuery(Message, tag=MessageType.RANK_TABLE_QUERY.value):
    pass


class RankTableAnswer(Message, tag=MessageType.RANK_TABLE.value):
    rank_size: int
    table: dict[str, Any] | None = None


class MetadataQuery(Message, tag=MessageType.METADATA_QUERY.value):
    """client -> broker: what is served (every servable, or only `servable`)."""

    id: RequestId
    servable: str | None = None


class Metadata(Message, tag=MessageType.METADATA.value):
    """broker -> client: one entry per (servable, version); `lost` names servables some worker served that
    none serves now."""

    id: RequestId
    servables: list[ServableInfo] = []
    lost: list[str] = []


class ModelCall(Message, tag=MessageType.MODEL_CALL.value):
    """worker -> stage 0, and stage k's leader -> stage k+1. `request_id` is for correlation in logs only."""

    call: int
    values: list[TensorSpec]
    request_id: RequestId | None = None
    rank: int | None = None


class ModelResult(Message, tag=MessageType.MODEL_RESULT.value):
    call: int
    rank: int
    values: list[TensorSpec]
    request_id: RequestId | None = None


class ModelError(Message, tag=MessageType.MODEL_ERROR.value):
    call: int | None
    rank: int
    code: ErrorCode
    message: str


M = TypeVar("M", bound=Message)

MESSAGE_TYPES: tuple[type[Message], ...] = (
    Request, Reply, Error, WorkerStatus, WorkerDisconnect, Heartbeat, AgentRegister, AgentConfigure, AgentReady,
    AgentFailed, AgentRejected, AgentShutdown, RankTableQuery, RankTableAnswer, MetadataQuery, Metadata, ModelCall,
    ModelResult, ModelError,
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Request | Reply | Error | WorkerStatus | WorkerDisconnect | Heartbeat
                                   | AgentRegister | AgentConfigure | AgentReady | AgentFailed | AgentRejected
                                   | AgentShutdown | RankTableQuery | RankTableAnswer | MetadataQuery | Metadata
                                   | ModelCall | ModelResult | ModelError)
_peek_decoder = msgspec.msgpack.Decoder()


def encode(message: Message) -> bytes:
    """A message as its header frame."""
    return _encoder.encode(message)


def decode(frame: Any, *accepted: type[M]) -> M:
    """Decode a header frame into its message, which must be one of `accepted` (the messages the link carries);
    anything else raises ServingError(INVALID_ARGUMENT) naming the problem."""
    try:
        message = _decoder.decode(frame.buffer if hasattr(frame, "buffer") else frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        version = _peek_field(frame, "v")
        if version is not None and version != PROTOCOL_VERSION:
            raise _version_error(version) from None
        raise ServingError(ErrorCode.INVALID_ARGUMENT, f"malformed header: {exc}") from None
    if message.v != PROTOCOL_VERSION:
        raise _version_error(message.v)
    if accepted and not isinstance(message, accepted):
        raise ServingError(ErrorCode.INVALID_ARGUMENT,
                           f"{type(message).__name__} is not accepted here; expected "
                           f"{' or '.join(m.__name__ for m in accepted)}")
    return message  # type: ignore[return-value]


class _OnlyId(msgspec.Struct):
    id: Any = None


_id_decoder = msgspec.msgpack.Decoder(_OnlyId)


def peek_request_id(frame: Any) -> RequestId | None:
    """The `id` of a header that failed `decode`, so the error reply can still be matched by the client; None
    when the frame is not a map with an int or str `id`. Reading only `id` skips the other fields unchecked (a
    broken string elsewhere does not hide the id); a map with non-string keys is read whole."""
    try:
        request_id = _id_decoder.decode(frame.buffer if hasattr(frame, "buffer") else frame).id
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        request_id = _peek_field(frame, "id")
    return request_id if isinstance(request_id, int | str) and not isinstance(request_id, bool) else None


def _peek_field(frame: Any, name: str) -> Any:
    try:
        document = _peek_decoder.decode(frame.buffer if hasattr(frame, "buffer") else frame)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    return document.get(name) if isinstance(document, dict) else None


def _version_error(version: Any) -> ServingError:
    return ServingError(ErrorCode.INVALID_ARGUMENT,
                        f"unsupported protocol version {version!r}; this server speaks {PROTOCOL_VERSION}")


def error_frame(request_id: RequestId | None, code: ErrorCode, message: str) -> bytes:
    """The header of an ERROR reply (it has no value frames)."""
    return encode(Error(id=request_id, code=code, message=message))


def deadline_of(timeout_ms: float | None, now: float | None = None) -> float | None:
    """The monotonic time a request's `timeout_ms` ends, counted from its arrival; None when it has none."""
    if timeout_ms is None:
        return None
    return (now if now is not None else time.monotonic()) + timeout_ms / 1000


# Topics on the PUB sockets that feed a stage. Agents subscribe to MODEL_CALL_TOPIC for work and to
# SUBSCRIBER_TOPIC_PREFIX + rank so the publisher's XPUB sees exactly which ranks are listening.
MODEL_CALL_TOPIC = b"C"
SUBSCRIBER_TOPIC_PREFIX = b"R"


def subscription_topic(rank: int) -> bytes:
    """The topic whose subscription tells a publisher that `rank` listens (nothing is published on it)."""
    return SUBSCRIBER_TOPIC_PREFIX + str(rank).encode()


def parse_subscription(event: bytes) -> tuple[bool, int] | None:
    """An XPUB subscription event (b'\\x01' + topic to subscribe, b'\\x00' + topic to unsubscribe) as
    (subscribed, rank); None for the data topic or anything else."""
    topic = event[1:]
    if event[:1] not in (b"\x00", b"\x01") or not topic.startswith(SUBSCRIBER_TOPIC_PREFIX):
        return None
    digits = topic[len(SUBSCRIBER_TOPIC_PREFIX):]
    if not digits.isdigit():
        return None
    return event[:1] == b"\x01", int(digits)


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
