"""Every example's export runs only the kernels its math needs (issue 23): each shard's kernel list, read from the
MindIR (`zmserve.export.graph_kernels`), equals the minimum for its layout, counted op by op.

The minimum is written out per layer from the math (a Linear is MatMul + bias Add on the stage's flat states; a
LayerNorm one kernel; AllReduce only when the tensor-parallel size is above 1; a whole-axis slice never), so a
kernel added by accident (a slice of a whole axis, a reshape per Linear, an explicit LayerNorm, a scale Mul
that folds into weights) fails here. Outputs are checked by each example's own tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

EXPORT = """
import json, sys
from pathlib import Path
from tests.cluster import load_example_module
export = load_example_module(Path(sys.argv[1]) / "export_model.py", "export_model", keep_siblings=True).export
from zmserve.export import graph_kernels
out = Path(sys.argv[2])
layouts = json.loads(sys.argv[3])
result = {{}}
for index, layout in enumerate(layouts):
    paths = {call}
    result[index] = [graph_kernels(path) for path in paths]
print(json.dumps(result))
"""

CALLS = {
    "matmul_distributed": "export(out / str(index), layout[0], None, layout[1]) or "
                          "[out / str(index) / f'device{r}' / 'matmul.mindir' for r in range(layout[0])]",
    "mlp_pipeline": "export(out / str(index), layout[0], layout[1], dynamic_batch=layout[2])",
    "minilm": "export(out / str(index), layout[0], layout[1], None)",
    "big_model": "export(out / str(index), 'small', layout[0], layout[1])",
}


def kernels_of(example: str, layouts: list[list], tmp_path: Path) -> dict[int, list[list[str]]]:
    """Export `example` at every layout in one process; per layout, each rank's kernel list."""
    script = EXPORT.format(repo=str(REPO), call=CALLS[example])
    done = subprocess.run([sys.executable, "-c", script, str(EXAMPLES / example), str(tmp_path), json.dumps(layouts)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "GLOG_v": "3"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {int(key): value for key, value in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def times(counts: dict[str, int], factor: int) -> Counter:
    return Counter({op: count * factor for op, count in counts.items()})


def test_matmul_shards_are_matmul_neg_plus_only_what_sharding_adds(tmp_path: Path) -> None:
    layouts = [[1, False], [2, False], [8, False], [1, True], [2, True]]
    found = kernels_of("matmul_distributed", layouts, tmp_path)
    for index, (rank_size, batched) in enumerate(layouts):
        matmul = "MatMulExt" if batched else "MatMul"  # the batched input broadcasts the weight: one kernel
        expected = [matmul, "Neg"] if rank_size == 1 else ["StridedSlice", matmul, "AllReduce", "Neg"]
        assert found[index] == [expected] * rank_size, (rank_size, batched, found[index])


def test_mlp_blocks_are_two_matmuls_relu_and_three_adds(tmp_path: Path) -> None:
    layouts = [[1, 1, False], [4, 2, True]]
    found = kernels_of("mlp_pipeline", layouts, tmp_path)
    for index, (rank_size, stage_size, _) in enumerate(layouts):
        tp, blocks = rank_size // stage_size, 4 // stage_size
        block = {"MatMul": 2, "Add": 3, "ReLU": 1, **({"AllReduce": 1} if tp > 1 else {})}
        for kernels in found[index]:
            assert Counter(kernels) == times(block, blocks), (rank_size, stage_size, kernels)


MINILM_LAYER = {"MatMul": 6, "Add": 10, "Reshape": 4, "Transpose": 4, "BatchMatMul": 2, "Softmax": 1, "LayerNorm": 2,
                "Erf": 1, "Mul": 1, "Muls": 2}
"""Per encoder layer: 6 Linears (MatMul + bias Add), the mask Add, 2 residual Adds; heads split (Reshape +
Transpose) x3 and merged x1; scores and context BatchMatMul; exact GELU 0.5 u (1 + erf(u / sqrt 2))."""
MINILM_STAGE = {"Shape": 1, "Cast": 1, "Sub": 1, "Muls": 1, "Reshape": 3}
"""Per stage: the shape read once, the mask bias (Cast, 1 - m, x -1e9, Reshape to [B, 1, 1, L]), the states
flattened on entry and unflattened on exit."""
MINILM_EMBEDDINGS = {"Gather": 2, "OnesLike": 1, "CumSum": 1, "Sub": 1, "Add": 2, "LayerNorm": 1}


def test_minilm_stages_hold_the_encoder_math_only(tmp_path: Path) -> None:
    layouts = [[2, 2], [2, 1]]  # tp 1 in two stages; tp 2 in one
    found = kernels_of("minilm", layouts, tmp_path)
    for index, (rank_size, stage_size) in enumerate(layouts):
        tp = rank_size // stage_size
        for rank, kernels in enumerate(found[index]):
            stage = rank // tp
            expected = times(MINILM_LAYER, 6 // stage_size) + Counter(MINILM_STAGE)
            expected += times({"AllReduce": 2}, 6 // stage_size) if tp > 1 else Counter()
            expected += Counter(MINILM_EMBEDDINGS) if stage == 0 else Counter()
            assert Counter(kernels) == expected, (rank_size, stage_size, rank, Counter(kernels) - expected,
                                                  expected - Counter(kernels))


BIG_LAYER = {"MatMul": 6, "Add": 10, "Reshape": 4, "Transpose": 4, "BatchMatMul": 2, "Softmax": 1, "LayerNorm": 2,
             "Tanh": 1, "Mul": 3, "Muls": 3}
"""Per layer: 6 Linears (MatMul + bias Add), 2 residual Adds; heads split x3 and merged x1; tanh GELU
0.5 u (1 + tanh(c (u + 0.044715 u^3))) written out (the GeLU kernel is slower on CPU)."""


def test_big_model_stages_hold_the_decoder_math_only(tmp_path: Path) -> None:
    layouts = [[1, 1], [4, 2]]
    found = kernels_of("big_model", layouts, tmp_path)
    for index, (rank_size, stage_size) in enumerate(layouts):
        tp = rank_size // stage_size
        for rank, kernels in enumerate(found[index]):
            stage = rank // tp
            expected = times(BIG_LAYER, 4 // stage_size) + Counter({"Reshape": 2})  # flatten, unflatten
            expected += times({"AllReduce": 2}, 4 // stage_size) if tp > 1 else Counter()
            expected += Counter({"LayerNorm": 1}) if stage == stage_size - 1 else Counter()
            assert Counter(kernels) == expected, (rank_size, stage_size, rank, Counter(kernels) - expected,
                                                  expected - Counter(kernels))
