"""The examples' client.py scripts with nothing listening at their address: one line saying so, exit code 1, well
before the client's 60 s default timeout (the scripts wait while a servable starts, not for a broker that is
not there)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.cluster import REPO, free_port

pytestmark = pytest.mark.slow

CLIENTS = {  # the script and the timeout it gives each call, in seconds
    "examples/matmul_distributed/client.py": 10,
    "examples/mlp_pipeline/client.py": 10,
    "examples/minilm/client.py": 30,
}


def test_nothing_listening_is_one_line_at_the_call_timeout() -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    runs = {script: subprocess.Popen([sys.executable, str(REPO / script), address], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for script in CLIENTS}
    for script, process in runs.items():
        stdout, stderr = process.communicate(timeout=120)
        seconds = time.monotonic() - started
        assert process.returncode == 1 and stdout == ""
        assert stderr.splitlines() == [f"client.py: DEADLINE_EXCEEDED: no reply before the deadline "
                                       f"({CLIENTS[script]} s) from tcp://{address} (is a broker listening there?)"]
        assert seconds < CLIENTS[script] + 20, f"{script} took {seconds:.0f} s"
