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
    # worker -> broker -> client, before the REPLY or ERROR of a streamed request (`Request.stream`)
    PARTIAL = "partial"
    CANCEL = "cancel"
    # worker <-> broker (control). A worker repeats its status every heartbeat interval, so a restarted broker
    # learns every worker again within one interval.
    WORKER_STATUS = "worker_status"
    WORKER_DISCONNECT = "worker_disconnect"
    HEARTBEAT = "heartbeat"
    # worker -> broker, once per loop turn that publishes: which requests reached the model (never retried after)
    REQUESTS_STARTED = "requests_started"
    # broker -> worker: a draining worker is routed nothing more (every request sent before this has arrived)
    DRAIN_ACK = "drain_ack"
    # agent <-> worker (control)
    AGENT_REGISTER = "agent_register"
    AGENT_CONFIGURE = "agent_configure"
    AGENT_READY = "agent_ready"
    AGENT_FAILED = "agent_failed"
    AGENT_REJECTED = "agent_rejected"
    AGENT_SHUTDOWN = "agent_shutdown"
    AGENT_STOPPED = "agent_stopped"
    # agent launcher <-> worker: which ranks does this machine hold? And the launcher's own link: its hello (also
    # its heartbeat), and the agents the worker shut down, which the launcher ends if they do not exit by themselves
    RANK_TABLE_QUERY = "rank_table_query"
    RANK_TABLE = "rank_table"
    LAUNCHER_HELLO = "launcher_hello"
    AGENTS_SHUT_DOWN = "agents_shut_down"
    AGENT_EXITED = "agent_exited"
    # worker -> stage 0 -> ... -> last stage -> worker (data plane)
    MODEL_CALL = "model_call"
    MODEL_RESULT = "model_result"
    MODEL_ERROR = "model_error"
    # client -> broker -> client: what is served (the HTTP gateway's health and model-metadata endpoints)
    METADATA_QUERY = "metadata_query"
    METADATA = "metadata"
    # client -> broker -> client: servables, workers, agents and traffic (`zmserve status`, the status page)
    STATUS_QUERY = "status_query"
    STATUS = "status"


class BrokerCommand:
    """First frame of every message between a worker (DEALER) and the broker's worker-facing ROUTER.

    REQUEST, REPLY and CANCEL carry the client's routing identity in the second frame so the broker never
    re-encodes a header; CONTROL carries a header only.
    """

    REQUEST = b"\x01"
    REPLY = b"\x02"
    CONTROL = b"\x03"
    CANCEL = b"\x04"


class ErrorCode(StrEnum):
    """Error codes of a reply; the names follow gRPC's status codes."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"
    CANCELLED = "CANCELLED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    """The server refused this side's CURVE handshake; raised by the client itself, never sent on the wire."""


class Retry(StrEnum):
    """When the broker may send a request to another replica because its worker was lost (or answered UNAVAILABLE)
    before answering it (PROTOCOL.md §4.10). Chosen per servable (`declare_servable(retry_on_replica_loss=...)`)
    and per request (`Request.retry`, which wins)."""

    NEVER = "never"
    BEFORE_MODEL = "before_model"
    """Only while no model call of the request has been published (REQUESTS_STARTED): it never ran (default)."""
    UNTIL_RESULT = "until_result"
    """Also after that, as long as its worker had not received the model's result: the lost replica's model may have
    run it, but that result died with the worker; the request runs once more on another replica."""


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
    """A shard's inputs and outputs, from the `group_config.json` its export wrote (None when unknown). `stateful`:
    the subgraph also takes and updates a state the agents keep per sequence (its "state" entry), so each row of a
    call names its sequence (`ModelCall.sequences`)."""

    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    stateful: bool = False


class ShardInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a shard's export says it is (its `group_config.json`), so the worker can refuse a shard that does not
    belong to its servable before any group forms. None means the export did not say."""

    rank: int | None = None
    rank_size: int | None = None
    stage: int | None = None
    stage_size: int | None = None
    signature: ModelSignature = ModelSignature()
    subgraphs: list[ModelSignature] = []
    """One signature per subgraph file, in subgraph order (empty: one graph, `signature`)."""


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
    chat_template: str = ""
    """The servable folder's `chat_template.jinja` ("" when it has none): how the gateway's OpenAI chat endpoint
    turns messages into a prompt."""


class AgentStatus(msgspec.Struct, frozen=True):
    """One rank of a worker. `state`: the agent's (`registered`, `configured`, `ready`); `restarting` when its
    process was lost or told to restart and no new one has registered yet; `missing` when none ever registered.
    `host`, `pid`: the process holding the rank, or the last one that did. `heartbeat_age`: seconds since the
    worker last heard from it (absent when no process holds the rank). `restarts`: processes that registered for
    the rank after its first one."""

    rank: int
    stage: int
    state: str
    host: str = ""
    pid: int = 0
    heartbeat_age: float | None = None
    restarts: int = 0


class WorkerInfo(msgspec.Struct, frozen=True):
    """One worker in a STATUS answer: what its last WORKER_STATUS said (`status_age` seconds ago), and `in_flight`,
    the requests the broker handed it that are not answered yet."""

    servable: str
    version: int
    ready: bool
    reason: str
    state: str
    address: str
    host: str
    pid: int
    methods: list[str]
    agents: list[AgentStatus]
    requests: int
    queued: int
    calls_in_flight: int
    in_flight: int
    status_age: float
    sequences: int = 0
    waiting_sequences: int = 0
    max_sequences: int = 0
    """Generation: sequences holding a slot, those of them waiting for their step, and the slots (0: the servable
    does not generate)."""


class TrafficPoint(msgspec.Struct, frozen=True, array_like=True):
    """`[start, requests, errors, p50_ms, p99_ms]` of one step of a servable's traffic, `start` in seconds before
    the answer (negative); the percentiles are null when no request of the step had a latency."""

    start: float
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None


class Traffic(msgspec.Struct, frozen=True):
    """One servable's requests as the broker saw them end: the last `window_s` seconds summed up, and `series`,
    one point per `step_s` seconds over the last minutes, oldest first. Latency is from a request's arrival at the
    broker to its answer; requests refused before any worker had them count as errors with no latency."""

    servable: str
    window_s: float
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    step_s: int
    series: list[TrafficPoint]


# ---- messages -----------------------------------------------------------------------------------------------
class Message(msgspec.Struct, tag_field="type", kw_only=True):
    """Every header: `v` is the protocol version, `type` (the struct's tag) the message type."""

    v: int = PROTOCOL_VERSION


class Request(Message, tag=MessageType.REQUEST.value):
    """client -> broker -> worker. `version` 0 means the newest version that has a ready worker. `retry`: when the
    broker may send it to another replica if its worker is lost (`Retry`, PROTOCOL.md §4.10); None takes the
    servable's choice (`retry_on_replica_loss`, by default `before_model`)."""

    id: RequestId
    servable: str
    method: str
    version: int = 0
    timeout_ms: float | None = None
    instances: list[list[TensorSpec]] = []
    retry: Retry | None = None
    stream: bool = False
    """Send what a generator stage yields as PARTIAL messages before the one REPLY or ERROR (PROTOCOL.md §4.11);
    a request that has had a partial is never sent to another replica."""
    trace: list[tuple[str, int]] | None = None
    """A sampled request's timeline, (hop, monotonic ns) stamps (zmserve/trace.py); None = not traced."""


class Reply(Message, tag=MessageType.REPLY.value):
    """worker -> broker -> client: one list of output specs per input instance."""

    id: RequestId
    instances: list[list[TensorSpec]] = []
    trace: list[tuple[str, int]] | None = None
    """A sampled request's timeline, (hop, monotonic ns) stamps (zmserve/trace.py); None = not traced."""


class Partial(Message, tag=MessageType.PARTIAL.value):
    """worker -> broker -> client: part of a streamed answer; the request still ends with exactly one REPLY or
    ERROR. `seq` counts 0, 1, 2, ... per request, so a client sees that nothing was lost or sent twice; `instances`
    describes the value frames after the header exactly as in REPLY (per instance, what it yielded in this step:
    an empty list for an instance that yielded nothing)."""

    id: RequestId
    seq: int
    instances: list[list[TensorSpec]] = []


class Error(Message, tag=MessageType.ERROR.value):
    """broker or worker -> client. `id` is None only when the request's own id could not be read."""

    id: RequestId | None
    code: ErrorCode
    message: str


class Cancel(Message, tag=MessageType.CANCEL.value):
    """client -> broker -> worker: the client gave up on request `id` (a cancelled future, a closed client, an HTTP
    caller that hung up). The broker answers it CANCELLED; the worker drops it if it has not reached the agents,
    and discards its result if it has."""

    id: RequestId


class WorkerStatus(Message, tag=MessageType.WORKER_STATUS.value):
    """`methods` in the order the servable declares them (the first is a client's default method);
    `signatures` once the agents have said what the model takes and gives. `draining`: the worker was asked to
    stop and finishes what it holds; the broker routes it nothing more and answers with DRAIN_ACK. `retry`: the
    servable's `retry_on_replica_loss`, for the requests that do not choose. The rest is what `zmserve status`
    shows: the worker's state, its distributed address, host and pid, one entry per rank, the requests it holds,
    the instances waiting to go to the model (`queued`: in a batch being filled, or in a call waiting for room in
    the pipeline) and the model calls in the pipeline. `chat_template`: the servable folder's chat template (for
    the gateway's OpenAI chat endpoint), "" when it has none."""

    servable: str
    version: int
    methods: list[str]
    ready: bool
    reason: str = ""
    signatures: dict[str, MethodSignature] = {}
    state: str = ""
    address: str = ""
    host: str = ""
    pid: int = 0
    agents: list[AgentStatus] = []
    requests: int = 0
    queued: int = 0
    calls_in_flight: int = 0
    draining: bool = False
    retry: Retry = Retry.BEFORE_MODEL
    sequences: int = 0
    waiting_sequences: int = 0
    max_sequences: int = 0
    """Generation (continuous batching): sequences holding a slot, those of them whose model call waits for its step,
    and the slots (`--max-sequences`; 0 when the model has no stateful subgraph)."""
    chat_template: str = ""


class WorkerDisconnect(Message, tag=MessageType.WORKER_DISCONNECT.value):
    pass


class Heartbeat(Message, tag=MessageType.HEARTBEAT.value):
    rank: int | None = None


class RequestsStarted(Message, tag=MessageType.REQUESTS_STARTED.value):
    """worker -> broker, before the worker publishes the first model call of these requests (one message per loop
    turn, the i-th client with the i-th id): from now on they may have reached a model, so they are never sent to
    another replica."""

    clients: list[bytes]
    ids: list[RequestId]


class DrainAck(Message, tag=MessageType.DRAIN_ACK.value):
    """broker -> worker, on a status that says `draining`: the broker routes this worker nothing more. It travels
    behind every request the broker sent before, so a worker that has it and holds nothing is done."""


class AgentRegister(Message, tag=MessageType.AGENT_REGISTER.value):
    rank: int
    host: str
    pid: int
    model_file: str
    publish_address: str
    replaces_pid: int | None = None
    previous_exit: str | None = None
    """Why the previous process of this rank ended, as its launcher saw it (e.g. killed at its memory limit)."""
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
    max_sequences: int = 0
    """Most sequences whose state the agent keeps at once (0: no bound); one more is refused RESOURCE_EXHAUSTED."""


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


class AgentStopped(Message, tag=MessageType.AGENT_STOPPED.value):
    """launcher -> worker, just before a launcher that is asked to stop ends this agent: the worker still re-forms
    its groups, but logs a stop, not a lost agent. `pid` names the process, so a late note never matches the
    agent that replaced it."""

    rank: int
    pid: int
    reason: str


class RankTableQuery(Message, tag=MessageType.RANK_TABLE_QUERY.value):
    pass


class RankTableAnswer(Message, tag=MessageType.RANK_TABLE.value):
    rank_size: int
    table: dict[str, Any] | None = None


class LauncherHello(Message, tag=MessageType.LAUNCHER_HELLO.value):
    """launcher -> worker, every heartbeat interval on the launcher's own DEALER: here is a launcher (its host and
    ranks, for the logs). The worker answers with heartbeats and tells it which agents it shuts down."""

    host: str
    pid: int
    ranks: list[int] = []


class StoppedAgent(msgspec.Struct, frozen=True):
    """An agent process the worker told to shut down (its rank and pid, as it registered them)."""

    rank: int
    pid: int


class AgentsShutDown(Message, tag=MessageType.AGENTS_SHUT_DOWN.value):
    """worker -> every launcher: these agents were told to shut down (or were given up on) because of `reason`. A
    launcher ends any of its own that is still running `grace_s` later: an agent inside MindSpore's init() holds the
    GIL, so its control thread cannot act on AGENT_SHUTDOWN."""

    agents: list[StoppedAgent]
    reason: str
    grace_s: float


class AgentExited(Message, tag=MessageType.AGENT_EXITED.value):
    """launcher -> worker: agent process `pid` of `rank` ended by itself, `why` as its launcher saw it (a signal,
    the OOM killer, an exit code). The worker restarts the agents at once, without waiting for the silence of its
    heartbeats or for the rank's next process to register."""

    rank: int
    pid: int
    why: str


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


class StatusQuery(Message, tag=MessageType.STATUS_QUERY.value):
    """client -> broker: everything `zmserve status` shows."""

    id: RequestId


class Status(Message, tag=MessageType.STATUS.value):
    """broker -> client: what is served (as in METADATA), every worker with its agents, each servable's traffic,
    the broker's uptime and the requests it has handed to workers and not had answered yet."""

    id: RequestId
    uptime_s: float
    in_flight: int
    servables: list[ServableInfo] = []
    lost: list[str] = []
    workers: list[WorkerInfo] = []
    traffic: list[Traffic] = []


class ModelCall(Message, tag=MessageType.MODEL_CALL.value):
    """worker -> stage 0, and stage k's leader -> stage k+1. `request_id` is for correlation in logs only.
    `subgraph` selects the graph. For a stateful subgraph, `sequences` names the sequence of each batch row: the
    agents feed that sequence's state in and keep its update. `release`: sequences whose state the agents free,
    before the call; a call with no values only releases (and has no result)."""

    call: int
    values: list[TensorSpec]
    request_id: RequestId | None = None
    rank: int | None = None
    subgraph: int = 0
    sequences: list[int] | None = None
    release: list[int] = []
    trace: list[tuple[str, int]] | None = None
    """A sampled request's timeline, (hop, monotonic ns) stamps (zmserve/trace.py); None = not traced."""


class ModelResult(Message, tag=MessageType.MODEL_RESULT.value):
    call: int
    rank: int
    values: list[TensorSpec]
    request_id: RequestId | None = None
    trace: list[tuple[str, int]] | None = None
    """A sampled request's timeline, (hop, monotonic ns) stamps (zmserve/trace.py); None = not traced."""


class ModelError(Message, tag=MessageType.MODEL_ERROR.value):
    call: int | None
    rank: int
    code: ErrorCode
    message: str


M = TypeVar("M", bound=Message)

MESSAGE_TYPES: tuple[type[Message], ...] = (
    Request, Reply, Partial, Error, Cancel, WorkerStatus, WorkerDisconnect, Heartbeat, RequestsStarted, DrainAck,
    AgentRegister, AgentConfigure, AgentReady, AgentFailed, AgentRejected, AgentShutdown, AgentStopped,
    RankTableQuery, RankTableAnswer, LauncherHello, AgentsShutDown, AgentExited, MetadataQuery, Metadata, ModelCall,
    ModelResult, ModelError, StatusQuery, Status,
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Request | Reply | Partial | Error | Cancel | WorkerStatus | WorkerDisconnect
                                   | Heartbeat | RequestsStarted | DrainAck | AgentRegister | AgentConfigure
                                   | AgentReady | AgentFailed | AgentRejected | AgentShutdown | AgentStopped
                                   | RankTableQuery | RankTableAnswer | LauncherHello | AgentsShutDown | AgentExited
                                   | MetadataQuery | Metadata | ModelCall | ModelResult | ModelError | StatusQuery
                                   | Status)
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


# ---- limits both sides of a link agree on -------------------------------------------------------------------
SHUTDOWN_GRACE_S = 1.0
"""How long an agent told to shut down may take to exit before its launcher ends it (a healthy one takes ~0.1 s)."""
MAX_REQUEST_BYTES = 1 << 30
"""Requests larger than this (all frames) are refused by the broker with RESOURCE_EXHAUSTED."""
