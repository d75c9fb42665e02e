"""Pipeline stages end to end: a residual MLP cut into stages x tensor-parallel shards, served for real and
checked against the unsharded numpy computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.cluster import MATMUL_CONFIG, MLP_EXAMPLE, Cluster, Exports, load_example_module, write_servable

pytestmark = pytest.mark.slow

mlp = load_example_module(MLP_EXAMPLE / "export_model.py", "mlp_export")


@pytest.mark.parametrize(("rank_size", "stage_size"), [(2, 2), (4, 2), (8, 2), (4, 4)])
def test_stages_match_unsharded_numpy(tmp_path: Path, exports: Exports, rank_size: int, stage_size: int) -> None:
    model_files = exports.mlp(rank_size, stage_size)
    config = MATMUL_CONFIG.format(rank_size=rank_size, stage_size=stage_size)
    cluster = Cluster(tmp_path, write_servable(tmp_path / "servables", "mlp", config), "mlp", model_files)
    weights = mlp.make_weights(mlp.DEFAULT_LAYERS, mlp.DEFAULT_HIDDEN, mlp.DEFAULT_FFN)
    rng = np.random.default_rng(rank_size * 10 + stage_size)
    try:
        cluster.wait_ready({"x": np.zeros((mlp.DEFAULT_BATCH, mlp.DEFAULT_HIDDEN), np.float32)})
        xs = [rng.standard_normal((mlp.DEFAULT_BATCH, mlp.DEFAULT_HIDDEN)).astype(np.float32) for _ in range(6)]
        with cluster.client() as client:
            futures = [client.infer_async({"x": x}) for x in xs]
            for x, future in zip(xs, futures, strict=True):
                y = future.result(timeout=60)[0]["y"]
                np.testing.assert_allclose(y, mlp.reference_forward(x, weights), atol=1e-5, rtol=0)
    finally:
        codes = cluster.stop()
    assert codes == {"agents": 0, "worker": 0, "broker": 0}, cluster.log_tails()


def test_each_rank_holds_its_stage_layers_and_its_slice(exports: Exports) -> None:
    import json

    model_files = exports.mlp(4, 2)
    for rank, path in enumerate(model_files):
        group = json.loads((path.parent / "group_config.json").read_text())
        assert group["stage"] == rank // 2 and group["tp_rank"] == rank % 2
        assert group["layers"] == ([0, 1] if rank < 2 else [2, 3])
