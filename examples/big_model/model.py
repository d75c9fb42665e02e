"""The big model's per-rank MindSpore Cell: one pipeline stage's layers, holding one tensor-parallel slice.

Parameters are created shape-only (no data): the export asks `weights.tensor` for each one while it writes the
rank to disk (zmserve/streamed_export.py), so building a rank's Cell costs no memory for its weights.

Inside a stage, each layer is Megatron-sharded over the stage's tp ranks: rank t keeps heads
[t*H/tp, (t+1)*H/tp) of Q/K/V (columns) and the matching rows of Wo, and ffn units [t*F/tp, ...) of Wup
(columns) with the matching rows of Wdown. Each row-parallel product is a partial sum: an AllReduce on the
stage's world group adds them, then the replicated bias is added once. The last stage ends with the final
LayerNorm. Input and output of every stage: hidden states float32 [batch, seq, hidden], both dims dynamic.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from weights import LAYER_NORM_EPS, Dims, check_layout, shard_shape, stage_layers

from zmserve.export import WORLD_GROUP

GELU_TANH = math.sqrt(2.0 / math.pi)
SCALED = ("q.weight", "q.bias")
"""Written pre-multiplied by 1/sqrt(head_dim), the attention's score scale: (q s) k = s (q k), no Mul kernel."""


def export_tensor(value: Any, dims: Dims, name: str) -> Any:
    """A weight as weights.tensor generates it -> as this graph stores it."""
    if name in SCALED:
        value = value * np.float32(1.0 / math.sqrt(dims.head_dim))
    return value


def build_stage_cell(dims: Dims, stage: int, stage_size: int, tp: int) -> tuple[Any, dict[str, tuple[int, str]]]:
    """The Cell of the ranks of `stage` (its tp ranks differ only in their weights, which the export writes), and
    {parameter name: (layer, tensor name)} for the export to fill it from (through `export_tensor`).

    Lean (issue 23): the states stay flat [batch * seq, hidden] through the stage (a Linear is MatMul + bias Add,
    no reshapes; the dynamic shape is read once), one LayerNorm kernel each, the score scale folded into the
    query weights."""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops
    from mindspore.common.initializer import Zero

    check_layout(dims, tp * stage_size, stage_size)
    created: dict[int, tuple[int, str]] = {}

    def param(layer: int, name: str) -> Parameter:
        """A shape-only parameter: the data is written by the export, straight from the seed. (MindSpore renames
        it after its attribute path, so it is remembered by identity.)"""
        shape = shard_shape(dims, layer, name, tp)
        parameter = Parameter(Tensor(shape=shape, dtype=ms.float32, init=Zero()), name=f"{layer}.{name}")
        created[id(parameter)] = (layer, name)
        return parameter

    class LayerNorm(nn.Cell):
        def __init__(self, layer: int, prefix: str) -> None:
            super().__init__()
            self.gamma = param(layer, f"{prefix}.gamma")
            self.beta = param(layer, f"{prefix}.beta")
            self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=LAYER_NORM_EPS)

        def construct(self, x):
            return self.norm(x, self.gamma, self.beta)[0]

    class Linear(nn.Cell):
        """x @ W + b on the stage's flat [batch * seq, in] states: MatMul + bias Add, no reshapes (and not
        `ops.dense`, 2-4x slower on CPU); row-parallel (reduce) sums the partial products before the bias."""

        def __init__(self, layer: int, prefix: str, reduce: bool) -> None:
            super().__init__()
            self.weight = param(layer, f"{prefix}.weight")
            self.bias = param(layer, f"{prefix}.bias")
            self.all_reduce = ops.AllReduce(group=WORLD_GROUP) if reduce and tp > 1 else None
            self.matmul = ops.MatMul()

        def construct(self, x):
            y = self.matmul(x, self.weight)
            if self.all_reduce is not None:
                y = self.all_reduce(y)
            return y + self.bias

    class Attention(nn.Cell):
        """This rank's heads; the output projection is row-parallel."""

        def __init__(self, layer: int) -> None:
            super().__init__()
            self.heads = dims.heads // tp
            self.query = Linear(layer, "q", reduce=False)
            self.key = Linear(layer, "k", reduce=False)
            self.value = Linear(layer, "v", reduce=False)
            self.output = Linear(layer, "o", reduce=True)
            self.scores = ops.BatchMatMul(transpose_b=True)
            self.context = ops.BatchMatMul()

        def split_heads(self, x, batch, length):
            return ops.transpose(ops.reshape(x, (batch, length, self.heads, dims.head_dim)), (0, 2, 1, 3))

        def construct(self, x, batch, length):
            query = self.split_heads(self.query(x), batch, length)
            key = self.split_heads(self.key(x), batch, length)
            value = self.split_heads(self.value(x), batch, length)
            probabilities = ops.softmax(self.scores(query, key), -1)
            context = ops.transpose(self.context(probabilities, value), (0, 2, 1, 3))
            return self.output(ops.reshape(context, (batch * length, self.heads * dims.head_dim)))

    class Mlp(nn.Cell):
        """This rank's ffn units; the down-projection is row-parallel. GELU in its tanh form, written out: the
        GeLU kernel is ~18x slower than these 8 kernels on CPU (docs/BENCHMARKS.md, per-kernel cost)."""

        def __init__(self, layer: int) -> None:
            super().__init__()
            self.up = Linear(layer, "up", reduce=False)
            self.down = Linear(layer, "down", reduce=True)

        def construct(self, x):
            up = self.up(x)
            return self.down(0.5 * up * (1.0 + ops.tanh(GELU_TANH * (up + 0.044715 * up * up * up))))

    class Layer(nn.Cell):
        def __init__(self, layer: int) -> None:
            super().__init__()
            self.ln1 = LayerNorm(layer, "ln1")
            self.attention = Attention(layer)
            self.ln2 = LayerNorm(layer, "ln2")
            self.mlp = Mlp(layer)

        def construct(self, x, batch, length):
            x = x + self.attention(self.ln1(x), batch, length)
            return x + self.mlp(self.ln2(x))

    class Stage(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.CellList([Layer(layer) for layer in stage_layers(dims, stage, stage_size)])
            self.final_ln = LayerNorm(dims.layers, "final_ln") if stage == stage_size - 1 else None

        def construct(self, x):
            batch, length, hidden = ops.shape(x)  # once per stage: each dynamic shape read is a kernel
            x = ops.reshape(x, (batch * length, hidden))  # flat through the stage: no per-Linear reshapes
            for layer in self.layers:
                x = layer(x, batch, length)
            if self.final_ln is not None:
                x = self.final_ln(x)
            return ops.reshape(x, (batch, length, hidden))

    ms.set_context(mode=ms.GRAPH_MODE)
    cell = Stage()
    sources = {parameter.name: created[id(parameter)] for parameter in cell.get_parameters()}
    if len(sources) != len(created):
        raise AssertionError(f"{len(created)} parameters created, {len(sources)} in the Cell")
    return cell, sources
