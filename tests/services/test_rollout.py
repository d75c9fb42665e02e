"""A rolling upgrade under steady load, on one machine: two versions of the MatMul in MindSpore Serving's version
folders (matmul/1/, matmul/2/, W = 0.5 and W = 0.25), one broker.

Version 1 serves; a worker for version 2 and its agents start while clients call version 0 without pause. Version
0 moves to version 2 only once v2's agents are ready (until then v1 keeps it, and nobody sees v2 forming), then v1's
worker gets SIGTERM: the broker routes it nothing more at once, it finishes what it holds and exits 0. Every
request is answered with a correct result of v1 or v2, none fails, and every request sent after the first v2 answer
gets v2's. Version 1's worker also tells a supervisor: READY=1 over $NOTIFY_SOCKET and its --ready-file once it
serves, STOPPING=1 and the file gone when it drains.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import MATMUL_CONFIG, Exports, log_events, wait_for, write_servable
from tests.steady_load import SteadyLoad
from zmserve.local import LocalCluster

pytestmark = pytest.mark.slow

V1, V2 = 0.5, 0.25
"""Each version's W value: y = -(x @ W) tells which version answered."""


def notifications(receiver: socket.socket) -> list[str]:
    """Every sd_notify datagram received so far, as its lines."""
    lines = []
    while True:
        try:
            lines += receiver.recv(4096, socket.MSG_DONTWAIT).decode().splitlines()
        except BlockingIOError:
            return lines


def test_rolling_upgrade_under_load_answers_every_request_correctly(tmp_path: Path, exports: Exports,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    servables = tmp_path / "servables"
    v1_files = exports.matmul(2, V1, into=servables / "matmul" / "1")
    v2_files = exports.matmul(2, V2, into=servables / "matmul" / "2")
    write_servable(servables, "matmul", MATMUL_CONFIG.format(rank_size=2, stage_size=1))
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # what systemd listens on for Type=notify
    systemd.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))  # the processes below inherit it
    ready_file = tmp_path / "v1.ready"
    cluster = LocalCluster(tmp_path, servables, "matmul", v1_files,
                           extra_worker_args=["--version", "1", "--ready-file", str(ready_file)])
    monkeypatch.delenv("NOTIFY_SOCKET")
    load = None
    told: list[str] = []
    try:
        cluster.wait_ready({"x": np.ones((128, 96), np.float32)})
        told += wait_for(lambda: notifications(systemd), timeout=10, what="READY=1")
        assert told == ["READY=1", "STATUS=serving matmul version 1"] and ready_file.exists()
        load = SteadyLoad(cluster.client_address, (V1, V2), clients=4).start()
        wait_for(lambda: load.counts()["w=0.5"] >= 50, timeout=60, what="v1 to answer under load")

        v2_address = cluster.start_worker("worker_v2", servables, "matmul", "--version", "0")  # 0: the newest, 2
        cluster.start_agents("agents_v2", v2_files, worker=v2_address)
        first_v2 = wait_for(lambda: load.first("w=0.25"), timeout=240, what="version 0 to move to v2",
                            details=cluster.log_tails)

        v1_worker = cluster.processes["worker"]
        os.kill(v1_worker.pid, signal.SIGTERM)
        assert v1_worker.wait(timeout=40) == 0, cluster.log_tails()
        told += notifications(systemd)
        assert "STOPPING=1" in told and told[told.index("STOPPING=1") + 1].startswith("STATUS=draining"), told
        assert not ready_file.exists()
        stopped = time.monotonic()
        wait_for(lambda: sum(1 for o in load.outcomes if o.sent > stopped) >= 50, timeout=60,
                 what="v2 alone to answer under load")
        outcomes = load.stop()
        load = None
    finally:
        if load is not None:
            load.stop()
        codes = cluster.stop()
        systemd.close()

    kinds = {o.what for o in outcomes}
    assert kinds == {"w=0.5", "w=0.25"}, f"every answer a correct v1 or v2 result, none failed: {kinds}"
    late_v1 = [o for o in outcomes if o.sent > first_v2.answered and o.what != "w=0.25"]
    assert not late_v1, f"{len(late_v1)} requests sent after v2 answered went elsewhere"
    (drained,) = log_events(cluster.logs["worker"], "drained")
    assert drained["why"] == "drained" and drained["held"] == 0, drained
    assert log_events(cluster.logs["broker"], "worker_draining")
    assert codes["worker_v2"] == 0 and codes["broker"] == 0, codes
    print(f"rollout: {len(outcomes)} requests, {sum(o.what == 'w=0.5' for o in outcomes)} answered by v1, "
          f"{sum(o.what == 'w=0.25' for o in outcomes)} by v2, v1 drained in {drained['seconds']} s")


def test_a_launcher_of_another_version_is_refused_with_the_reason(tmp_path: Path, exports: Exports) -> None:
    """The rollout mistake this layout makes visible: version 2's shards pointed at version 1's worker would serve
    v2's weights as v1. The worker refuses them for good, naming both versions, and their launcher exits 1."""
    servables = tmp_path / "servables"
    exports.matmul(2, V1, into=servables / "matmul" / "1")
    v2_files = exports.matmul(2, V2, into=servables / "matmul" / "2")
    write_servable(servables, "matmul", MATMUL_CONFIG.format(rank_size=2, stage_size=1))
    cluster = LocalCluster(tmp_path, servables, "matmul", v2_files, extra_worker_args=["--version", "1"])
    try:
        launcher = cluster.processes["agents"]
        assert launcher.wait(timeout=120) == 1, cluster.log_tails()
    finally:
        cluster.stop()
    error = cluster.logs["agents"].read_text()
    assert "is version 2 of servable 'matmul'; this worker serves version 1" in error, error[-2000:]
