"""One lifecycle for every zmserve service (Broker, Worker, Colocated, Gateway, AgentLauncher), and the one
runner of them all: in the foreground (`zmserve broker|worker|serve|agent|gateway`) or on background threads (the
Python API, `zmserve.server`).

A service is built (it binds, so a taken port fails at once), then `run()` serves until it is stopped and releases
what it holds before it returns (an exit code, or None for 0). `stop()` ends it at once (SIGINT); `drain()` ends
it gracefully (SIGTERM: what systemd and Kubernetes send): it takes nothing new, finishes what it holds, then
stops; a service that holds no work of its own stops as for `stop()`. Both only set flags: they run inside
signal handlers. A second signal ends the process at once (zmserve/supervision.py).
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

from zmserve.logs import get_logger
from zmserve.supervision import handle_stop_signals

log = get_logger("server")


class Service(Protocol):
    def run(self) -> int | None:
        """Serve until stopped or drained; then release everything; the process's exit code (None: 0)."""
        ...

    def stop(self) -> None:
        """End at once (requests held are answered, not finished). Safe in a signal handler."""
        ...

    def drain(self) -> None:
        """End gracefully: nothing new, finish what is held, then stop. Safe in a signal handler."""
        ...


def run_in_foreground(service: Service) -> int:
    """Run a service in this (main) thread: SIGINT stops it, SIGTERM drains it; its exit code."""
    handle_stop_signals(service.stop, service.drain)
    result = service.run()
    return result if isinstance(result, int) else 0


_background: list[Service] = []


def run_in_background(name: str, service: Service) -> None:
    """Run `service.run()` on a non-daemon thread, so the process lives until the services stop; SIGINT/SIGTERM
    stop every one of them. A service that fails stops the others and ends the process with exit code 1."""
    handle_stop_signals(stop_background)
    _background.append(service)
    threading.Thread(target=_run, args=(name, service), name=f"zmserve-{name}").start()


def stop_background() -> None:
    """Ask every background service of this process to finish: in-flight requests are answered, sockets closed."""
    for service in _background:
        service.stop()


def _run(name: str, service: Service) -> None:
    try:
        service.run()
    except Exception as exc:
        log.error("service_failed", service=name, error=str(exc), error_type=type(exc).__name__)
        stop_background()
        for thread in threading.enumerate():
            if thread.name.startswith("zmserve-") and thread is not threading.current_thread():
                thread.join(timeout=10)
        os._exit(1)
