"""kill -9 of an agent: the worker notices within 3 s, answers instead of hanging, and serves again on its own."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import (
    Cluster,
    Exports,
    agent_pids,
    log_events,
    matmul_reference,
    start_matmul_cluster,
    wait_for,
)
from zmserve.client import ClientError

pytestmark = pytest.mark.slow

ONES = {"x": np.ones((128, 96), np.float32)}


@pytest.fixture
def cluster(tmp_path: Path, exports: Exports):
    cluster = start_matmul_cluster(tmp_path, exports, 2, standby=True)  # restarts are timed
    try:
        yield cluster
    finally:
        cluster.stop()


def serves(cluster: Cluster) -> bool:
    with cluster.client() as client:
        try:
            x = np.random.default_rng(1).standard_normal((128, 96)).astype(np.float32)
            y = client.infer({"x": x}, timeout=5)[0]["y"]
        except ClientError as error:
            assert error.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), error
            return False
    np.testing.assert_allclose(y, matmul_reference(x), atol=1e-5)
    return True


@pytest.mark.parametrize("victim", [0, 1])
def test_killed_agent_is_noticed_answered_and_replaced(cluster: Cluster, victim: int) -> None:
    launcher = cluster.processes["agents"].pid
    agents = agent_pids(launcher)
    assert len(agents) == 2
    killed_at = time.time()
    os.kill(agents[victim], signal.SIGKILL)
    lost = wait_for(lambda: log_events(cluster.logs["worker"], "agent_lost"), timeout=5, what="agent_lost")
    noticed = datetime.fromisoformat(lost[0]["timestamp"].replace("Z", "+00:00")).timestamp()
    # silence for the 3 s liveness window (interval 1 s x 3) after the last heartbeat, which came before the
    # kill, plus at most one 0.1 s turn of the worker's loop and the scheduling slack of a loaded machine
    assert noticed - killed_at < 3.5, f"noticed after {noticed - killed_at:.2f} s"
    wait_for(lambda: serves(cluster), timeout=15, interval=0.2, what="serving again", details=cluster.log_tails)
    assert agent_pids(launcher) != agents


def test_frozen_agent_is_killed_and_replaced(cluster: Cluster) -> None:
    """SIGSTOP: the worker sees the heartbeats stop, the launcher sees the stopped state and replaces it."""
    launcher = cluster.processes["agents"].pid
    agents = agent_pids(launcher)
    os.kill(agents[0], signal.SIGSTOP)
    try:
        wait_for(lambda: log_events(cluster.logs["worker"], "agent_lost"), timeout=5, what="agent_lost")
        wait_for(lambda: log_events(cluster.logs["agents"], "agent_frozen"), timeout=10, what="agent_frozen")
        wait_for(lambda: serves(cluster), timeout=20, interval=0.2, what="serving again", details=cluster.log_tails)
    finally:
        if agents[0] in agent_pids(launcher):
            os.kill(agents[0], signal.SIGCONT)
