"""What a CURVE handshake's end means: a connecting socket's refusals (read by its owner, `Handshake`) and the
handshake log, a thread that reads the monitors of every other CURVE socket of the process and logs, throttled,
what a refused peer (or this side) must fix."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from zmserve.logs import get_logger
from zmserve.security.throttle import Throttle

log = get_logger("security")

Refused = Callable[[str], None]
"""Called (from the handshake log's thread) with the reason when a server refuses a connecting socket for good."""

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_MONITOR_STOPPED)
"""Only the end of each handshake (and the socket's close): nothing arrives per message."""


class Refusal(Enum):
    UNKNOWN_KEY = "the server does not know this side's public key"
    NEEDS_CURVE = "the server requires CURVE and this side has no keys"
    NO_CURVE = "the server does not use CURVE but this side was given keys"
    WRONG_SERVER_KEY = ("the server hung up during the CURVE handshake: the public key this side holds for it is "
                        "not its key (or it does not use CURVE)")
    PROTOCOL = "the CURVE handshake failed"


HUNG_UP = {True: Refusal.WRONG_SERVER_KEY, False: Refusal.NEEDS_CURVE}
"""What a server that hangs up during the handshake, twice in a row, most likely means. Which side notices a
mechanism mismatch first is a race: the other side only sees the connection close."""


def refusal_of(event: int, value: int, curve: bool) -> Refusal | None:
    """What a handshake event on a connecting socket says about this side's keys (None: not a refusal)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return Refusal.UNKNOWN_KEY
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return Refusal.NO_CURVE if curve else Refusal.NEEDS_CURVE
        return Refusal.PROTOCOL
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return HUNG_UP[curve]
    return None


def server_failure(event: int, value: int) -> str | None:
    """What a failed handshake on a binding socket says about the peer (None: nothing worth a line)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return ("a peer hung up during the handshake (it has no CURVE keys, or holds another public key for this "
                "server)")
    if event != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return None  # AUTH: the authenticator logged it, with the peer's address and key
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "a peer without CURVE keys tried to connect"
    if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return "a peer's CURVE hello could not be decrypted: it holds another public key for this server"
    return f"protocol error {_name(value)}"


def _name(value: int) -> str:
    names = [name for name in dir(zmq) if name.startswith("PROTOCOL_ERROR_") and getattr(zmq, name) == value]
    return names[0] if names else hex(value)


class Handshake:
    """A connecting socket's handshakes, read from its monitor by the thread that owns the socket. The monitor is
    readable only when a handshake ends, so a caller polls it next to the socket at no cost per message.

    libzmq does not reconnect after an authentication or mechanism failure, and reconnects (and fails again)
    when the server hangs up mid-handshake (a wrong server key; or a mechanism mismatch the server noticed
    first). A hang-up counts as a refusal only twice in a row, because a server that dies mid-handshake looks the
    same once."""

    def __init__(self, socket: zmq.Socket, curve: bool) -> None:
        self.curve = curve
        # a name of its own: pyzmq's default names the socket's descriptor, which a new socket may reuse while the
        # old monitor's endpoint is still being closed
        self.monitor = socket.get_monitor_socket(HANDSHAKE_EVENTS, addr=f"inproc://zmserve-monitor-{uuid.uuid4().hex}")
        self.refusal: Refusal | None = None
        self.silent_closes = 0

    def read(self) -> Refusal | None:
        """Take every queued event; the refusal if the latest handshake was refused."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return self.refusal
            self.take(event["event"], event["value"])

    def take(self, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.refusal, self.silent_closes = None, 0
            return
        refusal = refusal_of(event, value, self.curve)
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self.silent_closes += 1
            if self.silent_closes < 2:
                return
        if refusal is not None:
            self.refusal = refusal

    def close(self, socket: zmq.Socket) -> None:
        with contextlib.suppress(zmq.ZMQError):
            socket.disable_monitor()
        self.monitor.close(linger=0)


def send_unless_refused(socket: zmq.Socket, frames: list[Any], handshake: Handshake,
                        deadline: float | None = None) -> Refusal | None:
    """Send like a blocking send (waiting for room), but return the refusal instead when the server refused
    this socket: its only connection is then gone for good, and a blocking send would never return. Raises
    TimeoutError at `deadline` (monotonic)."""
    while True:
        try:
            socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return None
        except zmq.Again:
            pass
        if (refusal := handshake.read()) is not None:
            return refusal
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError
        socket.poll(50, zmq.POLLOUT)


@dataclass
class Watched:
    label: str
    server: bool
    curve: bool
    on_refused: Refused | None = None
    endpoint: str = ""
    handshake: Handshake | None = None


class HandshakeLog(threading.Thread):
    """Logs the failed handshakes of the process's CURVE sockets, in a thread of its own (nothing on a request's
    path): a binding socket logs what a refused peer did wrong, a connecting socket what this side must fix."""

    def __init__(self) -> None:
        super().__init__(name="zmserve-handshakes", daemon=True)
        self.added: queue.SimpleQueue[Watched] = queue.SimpleQueue()
        self.throttle = Throttle()

    def watch(self, socket: zmq.Socket, watched: Watched) -> None:
        """Called by the socket's owner before it binds or connects; the monitor goes to this thread."""
        watched.handshake = Handshake(socket, watched.curve)
        self.added.put(watched)

    def run(self) -> None:
        poller = zmq.Poller()
        watching: dict[zmq.Socket, Watched] = {}
        while True:
            while not self.added.empty():
                watched = self.added.get()
                assert watched.handshake is not None
                watched.handshake.monitor.setsockopt(zmq.LINGER, 0)
                watching[watched.handshake.monitor] = watched
                poller.register(watched.handshake.monitor, zmq.POLLIN)
            try:
                ready = poller.poll(100)
            except zmq.ContextTerminated:  # some context is terminating: let go of its monitors, keep the others
                for monitor in [m for m in watching if terminated(m)]:
                    self.forget(poller, watching, monitor)
                continue
            for monitor, _ in ready:
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    continue
                except zmq.ContextTerminated:
                    self.forget(poller, watching, monitor)
                    continue
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:  # the socket was closed
                    self.forget(poller, watching, monitor)
                    continue
                self.report(watching[monitor], event)

    @staticmethod
    def forget(poller: zmq.Poller, watching: dict[zmq.Socket, Watched], monitor: zmq.Socket) -> None:
        poller.unregister(monitor)
        monitor.close(linger=0)
        watching.pop(monitor, None)

    def report(self, watched: Watched, event: dict) -> None:
        endpoint = event["endpoint"].decode(errors="replace")
        if watched.server:
            why = server_failure(event["event"], event["value"])
            if why is not None and (suppressed := self.throttle.due((endpoint, why))) is not None:
                log.warning("handshake_failed", domain=watched.label, endpoint=endpoint, why=why, repeated=suppressed)
            return
        assert watched.handshake is not None
        watched.handshake.take(event["event"], event["value"])
        refusal = watched.handshake.refusal
        if refusal is None or event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return
        if (suppressed := self.throttle.due((endpoint, refusal))) is not None:
            log.error("handshake_refused", link=watched.label, endpoint=endpoint, why=refusal.value,
                      repeated=suppressed)
        if watched.on_refused is not None and event["event"] != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            watched.on_refused(f"the {watched.label} at {endpoint} refused this process: {refusal.value}")


def terminated(socket: zmq.Socket) -> bool:
    try:
        socket.getsockopt(zmq.EVENTS)
    except zmq.ContextTerminated:
        return True
    return False


_handshake_log: HandshakeLog | None = None
_lock = threading.Lock()


def handshake_log() -> HandshakeLog:
    global _handshake_log
    with _lock:
        if _handshake_log is None:
            _handshake_log = HandshakeLog()
            _handshake_log.start()
        return _handshake_log
