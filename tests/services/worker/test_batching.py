"""Dynamic batching: the Batcher's rules, and concurrent requests coalesced into shared model calls for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import MATMUL_EXAMPLE, Cluster, log_events, matmul_reference, write_servable
from zmserve_services.worker.batching import Batcher


def row(value: float, shape: tuple[int, ...] = (2, 3)) -> list[np.ndarray]:
    return [np.full(shape, value, np.float32)]


def test_full_batch_leaves_at_once_and_rows_keep_their_slots() -> None:
    batcher = Batcher(max_batch_size=3, max_delay=60)
    for i in range(7):
        batcher.add(("run", i), row(i))
    ready = batcher.take_ready()
    assert [len(b.slots) for b in ready] == [3, 3]
    assert ready[1].slots == [("run", 3), ("run", 4), ("run", 5)]
    assert ready[1].inputs[0].shape == (3, 2, 3)
    assert [float(ready[1].inputs[0][k, 0, 0]) for k in range(3)] == [3.0, 4.0, 5.0]
    assert len(batcher.pending) == 1


def test_partial_batch_waits_for_max_delay_then_leaves() -> None:
    batcher = Batcher(max_batch_size=8, max_delay=0.5)
    batcher.add(("a", 0), row(1))
    first = batcher.pending[next(iter(batcher.pending))].arrived[0]
    assert batcher.take_ready(now=first + 0.49) == []
    assert 0 < batcher.seconds_until_due() <= 0.5
    ready = batcher.take_ready(now=first + 0.5)
    assert [b.slots for b in ready] == [[("a", 0)]]
    assert batcher.seconds_until_due() is None


def test_instances_of_different_shapes_or_dtypes_are_never_mixed() -> None:
    batcher = Batcher(max_batch_size=2, max_delay=0)
    batcher.add(("a", 0), row(1, (2, 3)))
    batcher.add(("b", 0), row(2, (4, 3)))
    batcher.add(("c", 0), [np.zeros((2, 3), np.float64)])
    batcher.add(("d", 0), row(3, (2, 3)))
    ready = batcher.take_ready()
    assert sorted(tuple(slot for slot, _ in b.slots) for b in ready) == [("a", "d"), ("b",), ("c",)]


def test_fixed_batch_models_get_padded_batches() -> None:
    batcher = Batcher(max_batch_size=32, max_delay=0, pad_to=4)
    batcher.add(("a", 0), row(1))
    (ready,) = batcher.take_ready()
    assert ready.slots == [("a", 0)] and ready.inputs[0].shape == (4, 2, 3)


BATCHED_CONFIG = """
from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size=2, stage_size=1, with_batch_dim=True)


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""


@pytest.mark.slow
def test_concurrent_requests_share_model_calls_and_get_their_own_rows(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(MATMUL_EXAMPLE / "export_model.py"), "--rank-size", "2", "--batch-dim",
                    "--output-dir", str(tmp_path / "model"), "--rank-table", str(tmp_path / "table.json")],
                   check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    model_files = [tmp_path / "model" / f"device{r}" / "matmul.mindir" for r in range(2)]
    servable_dir = write_servable(tmp_path / "servables", "matmul", BATCHED_CONFIG)
    cluster = Cluster(tmp_path, servable_dir, "matmul", model_files, ["--max-batch-delay-ms", "300"])
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((128, 96)).astype(np.float32) for _ in range(8)]
    try:
        cluster.wait_ready({"x": xs[0]})
        with cluster.client() as client:
            futures = [client.infer_async({"x": x}) for x in xs]
            futures.append(client.infer_async([{"x": xs[1]}, {"x": xs[2]}]))
            results = [f.result(timeout=60) for f in futures]
    finally:
        codes = cluster.stop()
    for x, result in zip(xs, results, strict=False):
        np.testing.assert_allclose(result[0]["y"], matmul_reference(x), atol=1e-5)
    np.testing.assert_allclose(results[-1][1]["y"], matmul_reference(xs[2]), atol=1e-5)
    assert set(codes.values()) == {0}
    (stats,) = log_events(cluster.logs["worker"], "worker_stopped")
    assert stats["model_rows"] == 11
    assert stats["model_calls"] <= 4, stats


def test_an_idle_pipeline_takes_a_lone_instance_at_once() -> None:
    batcher = Batcher(max_batch_size=8, max_delay=60)
    batcher.add(("a", 0), row(1))
    assert batcher.take_ready() == []
    assert [b.slots for b in batcher.take_ready(idle=True)] == [[("a", 0)]]
