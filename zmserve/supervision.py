"""Child processes: they die with their parent, and they are always reaped."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal this process when its parent dies, so a SIGKILLed supervisor leaves no orphans."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def reap(process: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()
