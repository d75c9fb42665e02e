"""The agent -> launcher "loaded" pipe across a real fork/exec, as the launcher passes it (pass_fds)."""

from __future__ import annotations

import subprocess
import sys

from zmserve_services.agent.status_pipe import StatusPipe


def child(fd_code: str, pipe: StatusPipe) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", fd_code.format(fd=pipe.child_fd)], pass_fds=(pipe.child_fd,),
                          timeout=30)
    pipe.spawned()
    return done


def test_a_child_that_reports_loaded_is_seen_loaded_even_after_it_died() -> None:
    pipe = StatusPipe()
    try:
        assert not pipe.loaded()
        done = child("from zmserve_services.agent.status_pipe import report_loaded; report_loaded({fd})", pipe)
        assert done.returncode == 0
        assert pipe.loaded()
    finally:
        pipe.close()


def test_a_child_that_dies_before_loading_is_not_loaded() -> None:
    pipe = StatusPipe()
    try:
        done = child("import os; os._exit(9)", pipe)
        assert done.returncode == 9
        assert not pipe.loaded()  # EOF, no message: and no hang on the closed pipe
    finally:
        pipe.close()


def test_without_a_pipe_reporting_is_a_no_op() -> None:
    from zmserve_services.agent.status_pipe import report_loaded

    report_loaded(None)
