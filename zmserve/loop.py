"""The one event loop of every zmserve service: poll the sockets, read each ready one into its handler, do the
chores, until stopped.

A service is its sockets (each with the function that handles a message), a poll timeout and its chores
(liveness, deadlines, heartbeats). `run_loop` runs one service, or several in one thread: `zmserve serve`
runs the broker and a worker in one loop, so a request crosses no process and no thread between them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import zmq

from zmserve.logs import flush_bursts
from zmserve.transport import read_pending

SCAN_INTERVAL_S = 0.005
"""A busy loop scans what it holds for passed deadlines and silent peers at most this often (not after every
message): deadlines are answered within this much of their end, and the scans cost nothing per request."""

Handler = Callable[[list[zmq.Frame]], None]


class Polled(Protocol):
    """A service that runs in the loop (Broker, Worker; Colocated runs both in one). Its lifecycle is
    zmserve/lifecycle.py's: `run_loop` is its `run`."""

    def start(self) -> None:
        """Before the loop: say it started, start what it runs (schedulers)."""
        ...

    def shutdown(self) -> None:
        """After the loop: answer what it holds, close its sockets, end what it runs."""
        ...

    def handlers(self) -> list[tuple[zmq.Socket, Handler]]:
        """The sockets this service reads, each with the function that takes one message."""
        ...

    def poll_timeout(self) -> float:
        """Seconds the loop may sleep before this service's chores are due."""
        ...

    def do_chores(self) -> None:
        """Periodic work: liveness, deadlines, heartbeats. Runs after every wake-up."""
        ...


def run_loop(services: Sequence[Polled], stopped: threading.Event) -> None:
    """A loop service's whole `run`: start each, loop until `stopped`, shut them down in reverse order (in
    `zmserve serve` the worker answers what it holds through the broker, which is still up)."""
    for service in services:
        service.start()
    try:
        run_services(services, stopped)
    finally:
        for service in reversed(services):
            service.shutdown()


def run_services(services: Sequence[Polled], stopped: threading.Event) -> None:
    """Until `stopped` is set: wait for any socket (or the earliest chore), handle every message already queued
    on each ready socket, then let every service do its chores."""
    poller = zmq.Poller()
    handle: dict[zmq.Socket, Handler] = {}
    for service in services:
        for sock, handler in service.handlers():
            poller.register(sock, zmq.POLLIN)
            handle[sock] = handler
    while not stopped.is_set():
        timeout = min(service.poll_timeout() for service in services)
        for sock, _ in poller.poll(timeout=max(0, math.ceil(timeout * 1000))):
            read_pending(sock, handle[sock])
        for service in services:
            service.do_chores()
        flush_bursts()
