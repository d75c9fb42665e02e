"""Where agents' ranks come from: --rank-start + position, or the worker's rank table; two launchers on one
host stand in for two machines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import (
    MATMUL_CONFIG,
    MLP_EXAMPLE,
    Cluster,
    Exports,
    load_example_module,
    log_events,
    write_servable,
)

pytestmark = pytest.mark.slow

mlp = load_example_module(MLP_EXAMPLE / "export_model.py", "mlp_export_for_launchers")
X = np.random.default_rng(5).standard_normal((mlp.DEFAULT_BATCH, mlp.DEFAULT_HIDDEN)).astype(np.float32)


def check_served(cluster: Cluster) -> None:
    try:
        cluster.wait_ready({"x": X})
        with cluster.client() as client:
            y = client.infer({"x": X})[0]["y"]
        weights = mlp.make_weights(mlp.DEFAULT_LAYERS, mlp.DEFAULT_HIDDEN, mlp.DEFAULT_FFN)
        np.testing.assert_allclose(y, mlp.reference_forward(X, weights), atol=1e-5)
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, (codes, cluster.log_tails())


def test_two_launchers_split_by_rank_start(tmp_path: Path, exports: Exports) -> None:
    model_files = exports.mlp(4, 2)
    servable_dir = write_servable(tmp_path / "servables", "mlp", MATMUL_CONFIG.format(rank_size=4, stage_size=2))
    cluster = Cluster(tmp_path, servable_dir, "mlp", None)
    cluster.start_agents("machine_b", model_files[2:], "--rank-start", "2")
    cluster.start_agents("machine_a", model_files[:2], "--rank-start", "0")
    check_served(cluster)
    registered = {e["agent_rank"]: e["host"] for e in log_events(cluster.logs["worker"], "agent_registered")}
    assert sorted(registered) == [0, 1, 2, 3]


def test_ranks_from_the_workers_rank_table(tmp_path: Path, exports: Exports) -> None:
    """Machine 127.0.0.2 holds ranks 0 and 2, 127.0.0.3 holds 1 and 3 (by the table, not by position)."""
    model_files = exports.mlp(4, 2)
    table = {"version": "1.0", "server_count": "2", "status": "completed", "server_list": [
        {"server_id": "127.0.0.2", "host_nic_ip": "reserve",
         "device": [{"device_id": "0", "device_ip": "0.0.0.0", "rank_id": "0"},
                    {"device_id": "1", "device_ip": "0.0.0.0", "rank_id": "2"}]},
        {"server_id": "127.0.0.3", "host_nic_ip": "reserve",
         "device": [{"device_id": "0", "device_ip": "0.0.0.0", "rank_id": "1"},
                    {"device_id": "1", "device_ip": "0.0.0.0", "rank_id": "3"}]},
    ]}
    (tmp_path / "table.json").write_text(json.dumps(table))
    servable_dir = write_servable(tmp_path / "servables", "mlp", MATMUL_CONFIG.format(rank_size=4, stage_size=2))
    cluster = Cluster(tmp_path, servable_dir, "mlp", None, ["--rank-table", str(tmp_path / "table.json")])
    cluster.start_agents("machine_b", [model_files[1], model_files[3]], "--agent-ip", "127.0.0.3")
    cluster.start_agents("machine_a", [model_files[0], model_files[2]], "--agent-ip", "127.0.0.2")
    check_served(cluster)
    registered = {e["agent_rank"]: e["host"] for e in log_events(cluster.logs["worker"], "agent_registered")}
    assert registered == {0: "127.0.0.2", 1: "127.0.0.3", 2: "127.0.0.2", 3: "127.0.0.3"}
