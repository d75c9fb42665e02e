"""ShardModel: calls that reuse a compiled graph (`run_compiled`, MindSpore-private) answer exactly as the checked
`GraphCell` call does, for fixed and dynamic batch shapes; a new input shape always takes the checked path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import MATMUL_EXAMPLE, Exports, matmul_reference
from zmserve.collective import ShardModel

pytestmark = pytest.mark.slow


def export_batched(output_dir: Path) -> Path:
    subprocess.run([sys.executable, str(MATMUL_EXAMPLE / "export_model.py"), "--rank-size", "1", "--output-dir",
                    str(output_dir), "--rank-table", str(output_dir / "table.json"), "--batch-dim"],
                   check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    return output_dir / "device0" / "matmul.mindir"


def test_repeated_calls_reuse_the_compiled_graph_and_stay_correct(exports: Exports) -> None:
    model = ShardModel.load(exports.matmul(1)[0])
    xs = np.random.default_rng(3).standard_normal((4, 128, 96)).astype(np.float32)
    for x in xs:
        np.testing.assert_allclose(model.run([x])[0], matmul_reference(x), atol=1e-4)
    assert list(model.compiled) == [(((128, 96), "<f4"),)]
    with pytest.raises(Exception):  # noqa: B017  (MindSpore's own error type; the point is: no crash, no result)
        model.run([np.ones((128, 95), np.float32)])


def test_each_batch_size_is_compiled_once_and_outputs_follow_the_rows(tmp_path: Path) -> None:
    model = ShardModel.load(export_batched(tmp_path / "batched"))
    rng = np.random.default_rng(4)
    for batch in (3, 5, 3, 5, 1):
        x = rng.standard_normal((batch, 128, 96)).astype(np.float32)
        y = model.run([x])[0]
        assert y.shape == (batch, 128, 16)
        for row in range(batch):
            np.testing.assert_allclose(y[row], matmul_reference(x[row]), atol=1e-4)
    assert sorted(shape for ((shape, _),) in model.compiled) == [(1, 128, 96), (3, 128, 96), (5, 128, 96)]
