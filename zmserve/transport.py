"""Socket set-up and peer liveness shared by every service."""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from zmserve.protocol import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    LINGER_MS,
    RECONNECT_MAX_MS,
    RECONNECT_MIN_MS,
    ZERO_COPY_THRESHOLD_BYTES,
)


def new_socket(context: zmq.Context, kind: int, **options: int | bytes) -> zmq.Socket:
    """A socket that closes promptly, reconnects to a lost peer with backoff (libzmq doubles the interval up to
    the maximum), and sends big frames without copying."""
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, LINGER_MS)
    socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MIN_MS)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
    socket.copy_threshold = ZERO_COPY_THRESHOLD_BYTES
    for name, value in options.items():
        socket.setsockopt(getattr(zmq, name), value)
    return socket


class Liveness:
    """A peer is alive while it was heard from within interval x liveness (any traffic counts)."""

    def __init__(self, interval: float = HEARTBEAT_INTERVAL_S, liveness: int = HEARTBEAT_LIVENESS) -> None:
        self.interval = interval
        self.timeout = interval * liveness
        self.last_heard = time.monotonic()

    def heard(self) -> None:
        self.last_heard = time.monotonic()

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
