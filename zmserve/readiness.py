"""Telling a process supervisor that a service is ready, and when it stops being ready.

Two signals, both optional, both written by the service itself (no dependency):
  - systemd's notification protocol (`sd_notify`): when $NOTIFY_SOCKET is set (a unit with `Type=notify`), one
    datagram `READY=1` when the service is ready, `STOPPING=1` when it begins to stop, and `STATUS=<text>` with
    each change, which `systemctl status` shows;
  - a ready file (`--ready-file PATH`): present while the service is ready, removed when it is not (a Kubernetes
    `exec` readiness probe runs `test -f PATH`).

A worker is ready while it serves: READY=1 and the file when its agents are in, the file removed while it restarts
them or drains. systemd has no "not ready any more" besides STATUS, so READY=1 is sent at most once.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from zmserve.logs import get_logger

log = get_logger("readiness")


def sd_notify(*assignments: str) -> bool:
    """Send `KEY=value` lines to systemd's $NOTIFY_SOCKET (a path, or `@name` in the abstract namespace); False
    when there is none (not started by systemd with Type=notify) or it cannot be reached."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall("\n".join(assignments).encode())
    except OSError as error:
        log.warning("notify_failed", socket=address, message=str(error))
        return False
    return True


class Readiness:
    """One service's readiness, told to systemd and to a ready file as it changes."""

    def __init__(self, ready_file: str | Path | None = None) -> None:
        self.ready_file = Path(ready_file) if ready_file else None
        self.ready = False
        self.told_systemd = False
        self.withdraw()  # a file left by a process that died is not this process's readiness

    def set_ready(self, status: str) -> None:
        if self.ready_file is not None:
            self.ready_file.parent.mkdir(parents=True, exist_ok=True)
            self.ready_file.write_text(f"{os.getpid()}\n")
        if not self.told_systemd:
            self.told_systemd = sd_notify("READY=1", f"STATUS={status}")
        else:
            sd_notify(f"STATUS={status}")
        self.ready = True

    def set_not_ready(self, status: str) -> None:
        self.withdraw()
        sd_notify(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.withdraw()
        sd_notify("STOPPING=1", f"STATUS={status}")

    def withdraw(self) -> None:
        self.ready = False
        if self.ready_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.ready_file.unlink()
