"""A pipe from each agent to its launcher, carrying one fact: "my shard is loaded".

The launcher needs it to tell an agent that dies while loading (a shard that will never fit its memory limit:
restarting it forever helps nobody) from one that dies later while serving (restart it, as any crash). Everything
else the agent says goes to the worker; this is the only thing only the launcher acts on.
"""

from __future__ import annotations

import contextlib
import os

LOADED = b"loaded\n"


def report_loaded(fd: int | None) -> None:
    """Agent side: tell the launcher the shard is loaded (no-op without a pipe; a gone launcher is ignored)."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, LOADED)
        os.close(fd)


class StatusPipe:
    """Launcher side, one per agent process: `child_fd` goes to the agent (`pass_fds`), `loaded()` polls."""

    def __init__(self) -> None:
        self.read_fd, self.child_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.received = b""

    def spawned(self) -> None:
        """The child holds its end now; the launcher's copy would keep the pipe open after the child dies."""
        os.close(self.child_fd)

    def loaded(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.read_fd, 64):
                self.received += chunk
        return LOADED in self.received

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.read_fd)
