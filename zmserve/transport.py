"""Socket set-up and peer liveness shared by every service."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

import zmq

from zmserve.protocol import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    LINGER_MS,
    RECONNECT_MAX_MS,
    RECONNECT_MIN_MS,
    ZERO_COPY_THRESHOLD_BYTES,
)

if TYPE_CHECKING:
    from zmserve.security import Curve


def new_socket(context: zmq.Context, kind: int, curve: Curve | None = None, **options: int | bytes) -> zmq.Socket:
    """A socket that closes promptly, reconnects to a lost peer with backoff (libzmq doubles the interval up to
    the maximum), and sends big frames without copying. With `curve` (zmserve/security.py) its link is encrypted
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


def frame_bytes(frame: zmq.Frame | bytes) -> bytes:
    """A frame's bytes, whether it came from a socket (zmq.Frame) or from a service in the same process."""
    return frame.bytes if isinstance(frame, zmq.Frame) else frame


class Delivery(Enum):
    SENT = "sent"
    WOULD_BLOCK = "would_block"
    """The peer's queue is full (high-water mark): it is not reading."""
    UNREACHABLE = "unreachable"
    """A ROUTER_MANDATORY socket has no connected peer of that identity."""


def send_nonblocking(socket: zmq.Socket, frames: Sequence[Any]) -> Delivery:
    """Send without ever blocking the loop; the caller decides what an undelivered message means."""
    try:
        socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
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


def drain(socket: zmq.Socket, handle: Callable[[list[zmq.Frame]], None], limit: int = 1000) -> None:
    """Handle every message already queued on `socket` (up to `limit`), so that liveness checks that follow
    never judge a peer by messages still waiting to be read."""
    for _ in range(limit):
        try:
            frames = socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
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
