"""The gateway's one link to the broker: a DEALER on the gateway's asyncio loop that sends a request and
awaits its reply.

Everything the gateway says to the broker goes through here, and only here are zmserve's wire names used
(`zmserve.codec`, `zmserve.protocol`); the HTTP side sees Python values, `ServingError`s and the dataclasses
below. A request is an ordinary client REQUEST (`infer`): same header, same deadline (`timeout_ms`, enforced by
the broker and the worker, and here with the client's 50 ms grace), same error codes, so batching, routing and
overload behave exactly as for the zmq client. One DEALER carries every request of the gateway; replies are
matched by `id`.

The DEALER is a plain zmq socket whose FD the loop watches (`add_reader`): sends never block (NOBLOCK; a full
queue means the broker is not reading), and `drain` reads every queued reply when the FD fires and after each
send (the FD is edge-triggered: a send can take the signal of a reply that has already arrived). Measured
against zmq.asyncio's futures on the same requests, this costs 70-80 us less CPU and 150-250 us less latency
per request.

`served` asks the broker what it serves (METADATA_QUERY); the OIP metadata, ready and default-method answers
are built from it.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import zmq

from zmserve.codec import Instance, decode_instances, encode_instances, pack_header, unpack_header
from zmserve.logs import get_logger
from zmserve.protocol import ErrorCode, MessageType, ServingError, normalize_address
from zmserve.transport import new_socket

log = get_logger("gateway")

REPLY_GRACE_S = 0.05
"""The broker answers DEADLINE_EXCEEDED itself at the deadline; waiting this much longer lets that answer (or a
reply racing it) arrive before the gateway gives up on its own, as the zmq client does."""


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a method as the worker describes it; unknown parts are None."""

    name: str
    dtype: str | None = None
    """A zmserve dtype name (`float32`, `str`, `bytes`, ...)."""
    shape: tuple[int, ...] | None = None
    """-1 for a dimension of any size."""


@dataclass(frozen=True)
class MethodSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class ServableVersion:
    """One (servable, version) as the broker sees it across its workers."""

    servable: str
    version: int
    methods: tuple[str, ...]
    ready: bool
    reason: str = ""
    signatures: dict[str, MethodSignature] = field(default_factory=dict)
    """Per method; empty while workers do not report signatures (see docs/HTTP.md, "Model metadata")."""


@dataclass(frozen=True)
class Served:
    """What the broker serves: every (servable, version), and the servables whose workers are all lost."""

    versions: tuple[ServableVersion, ...]
    lost: tuple[str, ...] = ()


class BrokerLink:
    def __init__(self, address: str) -> None:
        self.address = normalize_address(address)
        self.context = zmq.Context()
        self.socket = new_socket(self.context, zmq.DEALER)
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.socket.connect(self.address)
        self.loop.add_reader(self.socket.FD, self.drain)

    async def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.socket.FD)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ServingError(ErrorCode.UNAVAILABLE, "the gateway is shutting down"))
        self.pending.clear()
        self.socket.close()
        self.context.term()

    async def infer(self, servable: str, method: str, version: int, instances: list[Instance],
                    timeout: float) -> list[Instance]:
        """Run `method` on `instances`; their outputs, one dict per instance, or a ServingError."""
        descriptors, frames = encode_instances(instances)
        request_id = next(self.ids)
        header = pack_header(MessageType.REQUEST, id=request_id, servable=servable, method=method, version=version,
                             timeout_ms=int(timeout * 1000), instances=descriptors)
        reply, reply_frames = await self.call(request_id, [header, *frames], timeout)
        return decode_instances(reply.get("instances"), reply_frames)

    async def served(self, servable: str | None, timeout: float) -> Served:
        """What the broker serves: `servable`'s versions, or every servable's (None)."""
        request_id = next(self.ids)
        reply, _ = await self.call(request_id, [pack_header(MessageType.METADATA_QUERY, id=request_id,
                                                            servable=servable)], timeout)
        if reply["type"] != MessageType.METADATA:
            raise ServingError(ErrorCode.INTERNAL, f"the broker answered a metadata query with {reply['type']}")
        return Served(tuple(_servable_version(entry) for entry in reply.get("servables") or []),
                      tuple(reply.get("lost") or ()))

    async def call(self, request_id: int, frames: list[Any], timeout: float) -> tuple[dict[str, Any], list]:
        """Send one message, await the answer with this id: (header, value frames), or raise its ServingError."""
        assert self.loop is not None, "start() first"
        future = self.loop.create_future()
        self.pending[request_id] = future
        try:
            try:
                self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                raise ServingError(ErrorCode.UNAVAILABLE, f"the broker at {self.address} is not reading (the "
                                                          "gateway's queue to it is full)") from None
            self.loop.call_soon(self.drain)
            async with asyncio.timeout(timeout + REPLY_GRACE_S):
                header, values = await future
        except TimeoutError:
            raise ServingError(ErrorCode.DEADLINE_EXCEEDED,
                               f"no reply from the broker at {self.address} within {timeout:g} s") from None
        finally:
            self.pending.pop(request_id, None)
        if header["type"] == MessageType.ERROR:
            raise ServingError(_error_code(header.get("code")), str(header.get("message")))
        return header, values

    def drain(self) -> None:
        """Hand every queued answer to the request awaiting it; answers nobody awaits any more are dropped."""
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                header = unpack_header(frames[0])
            except ServingError as error:
                log.warning("broker_reply_malformed", message=error.message)
                continue
            request_id = header.get("id")
            future = self.pending.get(request_id) if isinstance(request_id, int) else None
            if future is None or future.done():
                log.info("late_reply_dropped", request_id=request_id)
                continue
            future.set_result((header, frames[1:]))


def _error_code(code: Any) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL


def _servable_version(entry: dict[str, Any]) -> ServableVersion:
    signatures = {method: MethodSignature(_specs(spec.get("inputs")), _specs(spec.get("outputs")))
                  for method, spec in (entry.get("signatures") or {}).items() if isinstance(spec, dict)}
    return ServableVersion(str(entry.get("servable")), int(entry.get("version", 0)),
                           tuple(entry.get("methods") or ()), bool(entry.get("ready")), str(entry.get("reason", "")),
                           signatures)


def _specs(descriptors: Any) -> tuple[TensorSpec, ...]:
    specs = []
    for descriptor in descriptors or []:
        shape = descriptor.get("shape")
        specs.append(TensorSpec(str(descriptor.get("name")), descriptor.get("dtype"),
                                tuple(shape) if isinstance(shape, list) else None))
    return tuple(specs)
