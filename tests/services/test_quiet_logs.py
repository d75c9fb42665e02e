"""Logs that do not cry wolf: a launcher that stops is a stop (info), not lost agents; a storm of rejected requests
(a worker stopped under load) is a handful of broker lines whose counts add up to every rejection."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import MATMUL_CONFIG, Cluster, Exports, log_events, wait_for, write_servable
from zmserve.client import ClientError

pytestmark = pytest.mark.slow

ONES = {"x": np.ones((128, 96), np.float32)}
STORM_S = 6.0
CALLERS = 8


@pytest.fixture(scope="module")
def matmul(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> tuple[Path, list[Path]]:
    workdir = tmp_path_factory.mktemp("quiet_logs")
    model_files = exports.matmul(2)
    return write_servable(workdir / "servables", "matmul", MATMUL_CONFIG.format(rank_size=2, stage_size=1)), \
        model_files


@pytest.fixture
def cluster(tmp_path: Path, matmul: tuple[Path, list[Path]]) -> Iterator[Cluster]:
    """Serving, known from the worker's `serving` line: no request was refused while it started."""
    servable_dir, model_files = matmul
    cluster = Cluster(tmp_path, servable_dir, "matmul", model_files)
    try:
        wait_for(lambda: log_events(cluster.logs["worker"], "serving"), timeout=180, what="serving",
                 details=cluster.log_tails)
        yield cluster
    finally:
        cluster.stop()


def test_start_up_at_info_is_a_line_per_process_and_serving(cluster: Cluster) -> None:
    """At info, the start of a servable is a handful of lines (7 here: 3 broker, 3 worker, 1 launcher; a few more
    if a real failure restarts the agents on a loaded machine, which also shows at warning), `serving` once;
    per-agent detail is at debug."""
    lines = [line for name in ("broker", "worker", "agents") for line in log_records(cluster.logs[name])]
    shown = [line["event"] for line in lines if line["level"] == "info"]
    assert shown.count("serving") == 1 and len(shown) <= 12, shown
    assert {"broker_started", "worker_started", "launcher_started"} <= set(shown)
    per_agent = {"agent_started", "agent_registering", "agent_registered", "agent_loaded", "agent_ready"}
    assert not per_agent & {line["event"] for line in lines if line["level"] != "debug"}


def log_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_a_launcher_that_stops_is_logged_as_a_stop_not_as_lost_agents(cluster: Cluster) -> None:
    launcher = cluster.processes["agents"]
    os.kill(launcher.pid, signal.SIGTERM)
    assert launcher.wait(timeout=30) == 0
    [stopped] = wait_for(lambda: log_events(cluster.logs["worker"], "agent_stopped"), timeout=10,
                         what="agent_stopped", details=cluster.log_tails)
    assert stopped["level"] == "info" and stopped["reason"] == "its launcher is stopping"
    # the first note restarted the groups and forgot every agent: none can be lost later
    assert not log_events(cluster.logs["worker"], "agent_lost")
    worker_lines = [line for line in cluster.logs["worker"].read_text().splitlines() if line.startswith("{")]
    assert not [line for line in worker_lines if '"level": "warning"' in line or '"level": "error"' in line]


def test_a_worker_stopped_under_load_makes_a_few_broker_lines_that_count_every_rejection(cluster: Cluster) -> None:
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def call() -> None:
        with cluster.client() as client:
            while not stop.is_set():
                try:
                    client.infer(ONES, timeout=5)
                    outcome = "OK"
                except ClientError as error:
                    outcome = f"{error.code}: {error.message}"
                with lock:
                    outcomes[outcome] += 1

    callers = [threading.Thread(target=call) for _ in range(CALLERS)]
    for caller in callers:
        caller.start()
    try:
        wait_for(lambda: outcomes["OK"] > 50, timeout=30, what="load")
        os.kill(cluster.processes["worker"].pid, signal.SIGTERM)
        assert cluster.processes["worker"].wait(timeout=20) == 0
        time.sleep(STORM_S)  # the storm itself: callers hammer a broker that has no worker
    finally:
        stop.set()
        for caller in callers:
            caller.join(timeout=30)
    os.kill(cluster.processes["broker"].pid, signal.SIGTERM)  # its exit writes the counts not yet written
    assert cluster.processes["broker"].wait(timeout=20) == 0

    from_broker = sum(n for outcome, n in outcomes.items() if "has no worker right now" in outcome
                      or "is not ready" in outcome)
    lines = log_events(cluster.logs["broker"], "request_rejected")
    counted = sum(line.get("repeated", 1) for line in lines)
    print(f"{from_broker} requests refused by the broker in {STORM_S:.0f} s: {len(lines)} log lines; "
          f"all outcomes {dict(outcomes.most_common(6))}")
    assert from_broker > 500, "not a storm: the test proves nothing"
    assert counted == from_broker, "every rejection is counted exactly once"
    assert len(lines) <= 8, [(line.get("repeated"), line.get("seconds")) for line in lines]
