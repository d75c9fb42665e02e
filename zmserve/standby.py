"""Standby processes: started before they are needed, with their slow imports done, they wait for one line on
stdin (their activation) and then become what it says.

Importing MindSpore takes 1-2 s on an idle machine and 15-20 s when eight processes import it at once on two
cores; a servable that restarts its agents would pay that on every restart. A standby pays it ahead of time, while
nothing waits for it. The agent launcher keeps one standby agent per rank (services/agent/launcher.py) and the
worker one standby scheduler per stage (services/worker/schedulers.py).

Parent: start the child with `stdin=subprocess.PIPE` and `STANDBY_FLAG`, then `activate` it (one line) or
`retire` it. Child: `wait_for_activation()`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

from zmserve.supervision import reap

STANDBY_FLAG = "--standby"


def activate(process: subprocess.Popen, line: str) -> bool:
    """Hand the standby its activation; False if it is gone (the caller then starts a process the slow way)."""
    if process.poll() is not None or process.stdin is None:
        return False
    try:
        process.stdin.write(line.encode() + b"\n")
        process.stdin.close()
    except OSError:  # BrokenPipeError: it died just now
        return False
    return True


def retire(process: subprocess.Popen, timeout: float = 2.0) -> int:
    """No longer needed: SIGTERM (an idle standby has no handler for it, and it may still be importing), reaped."""
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    return reap(process, timeout=timeout)


def wait_for_activation() -> str | None:
    """Child side: block until the parent activates this process; its line, or None at EOF (retired)."""
    line = sys.stdin.buffer.readline()
    return line.decode() if line.strip() else None
