"""Child processes: they die with their parent, and they are always reaped."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Callable

from zmserve.logs import get_logger

log = get_logger("supervision")

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal this process when its parent dies, so a SIGKILLed supervisor leaves no orphans."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def name_process(name: str) -> None:
    """Name this process as `ps`, `top` and /proc/<pid>/comm show it (15 bytes at most; call it from the main
    thread): the command line of a standby process says what it was started as, not what it became."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def process_name(pid: int) -> str | None:
    """The name of a running process (/proc/<pid>/comm), None if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return None


def reap(process: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def act_on_sigint() -> None:
    """Give SIGINT back its meaning (KeyboardInterrupt) when this process inherited it ignored: a shell without job
    control starts every background command (`zmserve ... &` in a script, a test runner's children) with SIGINT
    ignored, and Python then never installs its handler. zmserve promises that SIGINT stops any of its commands
    cleanly, wherever they were started. Only the main thread can install handlers."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def handle_stop_signals(stop: Callable[[], None], drain: Callable[[], None] | None = None) -> None:
    """SIGINT and SIGTERM call `stop`, or SIGTERM calls `drain` when given (a graceful stop: what systemd and
    Kubernetes send; SIGINT, a Ctrl-C, stops at once). Both must only set flags: they run inside a signal handler.
    A second signal ends the process at once with exit code 1. Only the main thread can install handlers."""
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:
            os._exit(1)
        stopping = True
        graceful = drain is not None and signum == signal.SIGTERM
        log.info("stopping", signal=signal.Signals(signum).name, drain=graceful)
        (drain if graceful and drain is not None else stop)()

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)
