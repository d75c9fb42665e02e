"""Shards that do not fit the servable: the launcher exits non-zero at once with the worker's reason as its one
line (naming both sides), and the worker keeps waiting for the right agents."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import MLP_EXAMPLE, Cluster, Exports, log_events
from zmserve.client import ClientError
from zmserve.transport import free_port_range

pytestmark = pytest.mark.slow

LAUNCHER_TIMEOUT_S = 120.0
"""The agents import numpy, zmq and MindSpore's wrappers before they register: seconds on a loaded machine."""


def test_the_matmul_shards_given_to_the_mlp_worker(tmp_path: Path, exports: Exports) -> None:
    model_files = exports.matmul(8)
    cluster = Cluster(tmp_path, MLP_EXAMPLE, "mlp", None)  # the 4-rank, 2-stage MLP servable; no agents yet
    try:
        started = time.monotonic()
        launcher = subprocess.run(
            [sys.executable, "-m", "zmserve.cli", "agent", "--worker", cluster.distributed_address,
             "--model-files", ",".join(map(str, model_files)), "--agent-start-port", str(free_port_range(8))],
            capture_output=True, text=True, timeout=LAUNCHER_TIMEOUT_S)
        seconds = time.monotonic() - started

        assert launcher.returncode != 0 and "Traceback" not in launcher.stderr
        error = launcher.stderr.splitlines()[-1]
        pattern = (rf"Error: rank (\d) cannot serve: the worker at tcp://{cluster.distributed_address} refused it: "
                   rf"the shard \S+/device\1/matmul\.mindir does not fit rank \1 of servable 'mlp' \(rank_size 4, "
                   rf"stage_size 2\): its export says rank_size 8 \(servable: 4\), stage_size 1 \(servable: 2\)")
        assert re.fullmatch(pattern + r"(, stage 0 \(servable: 1\))?", error), error
        print(f"the launcher exited after {seconds:.1f} s: {error}")

        cluster.check_alive()  # the worker keeps waiting for agents that fit
        with cluster.client() as client, pytest.raises(ClientError) as caught:
            client.infer({"x": np.ones((4, 8), np.float32)}, timeout=10)
        assert caught.value.code == "UNAVAILABLE"
        assert "waiting for agents: 0/4 registered" in caught.value.message
        refused = log_events(cluster.logs["worker"], "agent_rejected")
        assert refused and all(not event["retry"] for event in refused)
    finally:
        codes = cluster.stop()
    assert codes["worker"] == 0 and codes["broker"] == 0, cluster.log_tails()
