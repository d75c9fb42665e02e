"""Socket set-up and peer liveness shared by every service."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq
import zmq.backend

if TYPE_CHECKING:
    from zmserve.security import Curve

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 3
ZERO_COPY_THRESHOLD_BYTES = 64 * 1024
"""Tensors at least this big are sent without copying (pyzmq copies small frames anyway)."""
RECONNECT_MIN_MS = 100
RECONNECT_MAX_MS = 2000
"""Reconnection backoff to a lost peer: 100 ms, doubling up to 2 s."""
LINGER_MS = 0
"""Sockets close without waiting for unsent messages: every request is answered before a close, so a message
still queued at close belongs to a peer that is gone."""


def new_socket(context: zmq.Context, kind: int, curve: Curve | None = None, **options: int | bytes) -> zmq.Socket:
    """A socket that closes promptly, reconnects to a lost peer with backoff (libzmq doubles the interval up to
    the maximum), and sends big frames without copying. With `curve` (zmserve/security/) its link is encrypted
    and authenticated; None is plaintext."""
    socket = context.socket(kind)
    if curve is not None:
        curve.apply(socket)
    socket.setsockopt(zmq.LINGER, LINGER_MS)
    socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MIN_MS)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
    socket.copy_threshold = ZERO_COPY_THRESHOLD_BYTES
    for name, value in options.items():
        socket.setsockopt(getattr(zmq, name), value)
    return socket


class BindError(RuntimeError):
    """An address this process must listen on is taken or invalid; the message is one line for the user."""


def bind(socket: zmq.Socket, address: str, what: str) -> str:
    """Bind `socket` to `address` (port 0 or `*` picks a free port) and return the endpoint it got; a failure
    becomes one BindError line naming the address, `what` listens there, and the likely cause."""
    try:
        socket.bind(address)
    except zmq.ZMQError as error:
        if error.errno == zmq.EADDRINUSE:
            cause = "the address is already in use (another zmserve process, or another program, listens there)"
        elif error.errno == zmq.EADDRNOTAVAIL:
            cause = "no network interface of this machine has that address"
        else:
            cause = error.strerror
        raise BindError(f"cannot bind the {what} to {address}: {cause}") from None
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: whoever reaches this host runs on this machine, in its network namespace."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def data_endpoint(host: str, what: str) -> str:
    """Where to bind a data socket that peers reach at `host`: a Unix socket in the abstract namespace when the
    host is loopback (every peer is on this machine; docs/BENCHMARKS.md measures what ipc saves over loopback
    TCP), else a free TCP port on `host`."""
    if is_loopback_host(host):
        return f"ipc://@zmserve-{os.getpid()}-{uuid.uuid4().hex[:12]}-{what}"
    return f"tcp://{host}:0"


def frame_bytes(frame: zmq.Frame | bytes) -> bytes:
    """A frame's bytes, whether it came from a socket (zmq.Frame) or from a service in the same process."""
    return frame.bytes if isinstance(frame, zmq.Frame) else frame


class Delivery(Enum):
    SENT = "sent"
    WOULD_BLOCK = "would_block"
    """The peer's queue is full (high-water mark): it is not reading."""
    UNREACHABLE = "unreachable"
    """A ROUTER_MANDATORY socket has no connected peer of that identity."""


_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_FRAME_TYPES = (bytes, zmq.Frame, np.ndarray, memoryview)


def send_frames(socket: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """`send_multipart(frames, flags, copy=False)` without pyzmq's per-frame Python layer (flag enums, keyword
    handling), which costs more than the send itself on the hot path. Frames at least the socket's copy threshold
    are sent without copying. Every frame is checked first, so a bad one never leaves half a message queued."""
    for frame in frames:
        if not isinstance(frame, _FRAME_TYPES):
            memoryview(frame)  # TypeError for anything without the buffer interface
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        _send(socket, frame, flags | _SNDMORE if index < last else flags, False, False)


def recv_frames(socket: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """`recv_multipart(flags, copy=False)` without pyzmq's per-frame getsockopt(RCVMORE)."""
    frame = _recv(socket, flags, False, False)
    frames = [frame]
    while frame.more:
        frame = _recv(socket, 0, False, False)
        frames.append(frame)
    return frames


def send_nonblocking(socket: zmq.Socket, frames: Sequence[Any]) -> Delivery:
    """Send without ever blocking the loop; the caller decides what an undelivered message means."""
    try:
        send_frames(socket, frames, _NOBLOCK)
    except zmq.Again:
        return Delivery.WOULD_BLOCK
    except zmq.ZMQError as error:
        if error.errno != zmq.EHOSTUNREACH:
            raise
        return Delivery.UNREACHABLE
    return Delivery.SENT


class Liveness:
    """A peer is alive while it was heard from within interval x liveness (any traffic counts)."""

    def __init__(self, interval: float = HEARTBEAT_INTERVAL_S, liveness: int = HEARTBEAT_LIVENESS,
                 now: float | None = None) -> None:
        self.interval = interval
        self.timeout = interval * liveness
        self.last_heard = now if now is not None else time.monotonic()

    def heard(self, now: float | None = None) -> None:
        self.last_heard = now if now is not None else time.monotonic()

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.monotonic()) - self.last_heard > self.timeout


class HeartbeatClock:
    """Tells a loop when its next heartbeat is due."""

    def __init__(self, interval: float = HEARTBEAT_INTERVAL_S) -> None:
        self.interval = interval
        self.next_at = time.monotonic()

    def due(self, now: float | None = None) -> bool:
        now = now if now is not None else time.monotonic()
        if now >= self.next_at:
            self.next_at = now + self.interval
            return True
        return False

    def seconds_left(self) -> float:
        return max(0.0, self.next_at - time.monotonic())


def read_pending(socket: zmq.Socket, handle: Callable[[list[zmq.Frame]], None], limit: int = 1000) -> None:
    """Handle every message already queued on `socket` (up to `limit`; not "drain", which in zmserve means a
    graceful stop), so that liveness checks that follow
    never judge a peer by messages still waiting to be read."""
    for _ in range(limit):
        try:
            frames = recv_frames(socket, _NOBLOCK)
        except zmq.Again:
            return
        handle(frames)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` right now (the OS picks it; someone else may take it before it is bound again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def free_port_range(count: int) -> int:
    """The first of `count` consecutive free ports (agents publish on agent-start-port + i)."""
    for _ in range(100):
        base = free_port()
        if base + count >= 65535:
            continue
        probes: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no free port range")
