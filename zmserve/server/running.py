"""Services started from the Python API run on background threads; this module owns them and the signals."""

from __future__ import annotations

import os
import threading
from typing import Protocol

from zmserve.logs import get_logger
from zmserve.supervision import handle_stop_signals

log = get_logger("server")


class Service(Protocol):
    def run(self) -> None: ...
    def stop(self) -> None: ...


_services: list[Service] = []
_stopping = threading.Event()


def run_in_background(name: str, service: Service) -> None:
    """Run `service.run()` on a non-daemon thread, so the process lives until the services stop."""
    install_signal_handlers()
    _services.append(service)
    threading.Thread(target=_run, args=(name, service), name=f"zmserve-{name}").start()


def stop() -> None:
    """Ask every service of this process to finish: in-flight requests are answered, sockets closed."""
    _stopping.set()
    for service in _services:
        service.stop()


def install_signal_handlers() -> None:
    handle_stop_signals(stop)


def _run(name: str, service: Service) -> None:
    try:
        service.run()
    except Exception as exc:
        log.error("service_failed", service=name, error=str(exc), error_type=type(exc).__name__)
        stop()
        for thread in threading.enumerate():
            if thread.name.startswith("zmserve-") and thread is not threading.current_thread():
                thread.join(timeout=10)
        os._exit(1)
