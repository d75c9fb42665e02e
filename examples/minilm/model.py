"""all-MiniLM-L6-v2 (a 6-layer BERT encoder) as one MindSpore Cell per rank, sharded tensor- x pipeline-parallel.

Semi-auto parallel does not shard on CPU, so each rank's Cell is built from its own slice of the checkpoint:

- pipeline: the 6 layers are split evenly over `stage_size` stages; stage 0 also holds the embeddings (word,
  position, token type 0) and their LayerNorm. Activations cross stages outside the graph (zmserve moves them).
- tensor parallel, Megatron style, over the `tp` ranks of a stage: rank t keeps heads [t*12/tp, (t+1)*12/tp) of
  Q/K/V (column-parallel) and the matching input columns of the attention output projection (row-parallel), and
  rows [t*1536/tp, ...) of the MLP up-projection with the matching input columns of the down-projection. Each
  row-parallel product is a partial sum: an AllReduce on the stage's world group adds them, then the bias is
  added once. With tp == 1 the graph holds no collective op, so it runs in a process that is in no group.

Stage interface (fixed by the serving plumbing): stage 0 takes (input_ids, attention_mask) int32 [B, L]; a
non-last stage returns (hidden float32 [B, L, 384], attention_mask); a stage k > 0 takes (hidden, attention_mask);
the last stage returns hidden only. GELU is the exact erf form (ops.GeLU on CPU is the tanh approximation).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from assets import HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, LAYER_NORM_EPS, LAYERS

WORLD_GROUP = "mccl_world_group"
"""MindSpore's CPU collectives group, named explicitly: exported outside a group, the default would be HCCL's."""

MASKED_SCORE = -1e9
"""Added to the attention score of a padding key; exp() of it is exactly 0 in float32, no overflow possible."""


def check_layout(rank_size: int, stage_size: int) -> int:
    """The tensor-parallel size of a (rank_size, stage_size) layout, or ValueError if it does not fit the model."""
    if rank_size < 1 or stage_size < 1 or rank_size % stage_size:
        raise ValueError(f"rank_size {rank_size} must be a positive multiple of stage_size {stage_size}")
    if LAYERS % stage_size:
        raise ValueError(f"stage_size {stage_size} must divide the {LAYERS} layers")
    tp = rank_size // stage_size
    if HEADS % tp:
        raise ValueError(f"the tensor-parallel size {tp} (rank_size / stage_size) must divide the {HEADS} heads")
    return tp


def stage_layers(stage: int, stage_size: int) -> range:
    per_stage = LAYERS // stage_size
    return range(stage * per_stage, (stage + 1) * per_stage)


def shard_weights(weights: dict[str, np.ndarray], stage: int, stage_size: int, tp_rank: int,
                  tp: int) -> dict[str, np.ndarray]:
    """The checkpoint tensors one rank holds, already sliced, keyed by the Cell's parameter names.

    Linear weights keep Hugging Face's [out, in] layout (what `ops.dense` takes), so a column-parallel shard has
    out/tp rows and a row-parallel shard in/tp columns. The query weights and bias come pre-scaled by
    1/sqrt(head_dim), the attention's score scale.
    """
    heads_cols = slice(tp_rank * HIDDEN // tp, (tp_rank + 1) * HIDDEN // tp)
    score_scale = np.float32(1.0 / math.sqrt(HEAD_DIM))
    inter_cols = slice(tp_rank * INTERMEDIATE // tp, (tp_rank + 1) * INTERMEDIATE // tp)
    shard: dict[str, np.ndarray] = {}
    if stage == 0:
        shard["embeddings.word_embeddings"] = weights["embeddings.word_embeddings.weight"]
        shard["embeddings.position_embeddings"] = weights["embeddings.position_embeddings.weight"]
        shard["embeddings.token_type_embedding"] = weights["embeddings.token_type_embeddings.weight"][0]
        shard["embeddings.norm.weight"] = weights["embeddings.LayerNorm.weight"]
        shard["embeddings.norm.bias"] = weights["embeddings.LayerNorm.bias"]
    for position, layer in enumerate(stage_layers(stage, stage_size)):
        source, target = f"encoder.layer.{layer}.", f"layers.{position}."
        for part in ("query", "key", "value"):
            scale = score_scale if part == "query" else np.float32(1.0)  # (q s) k = s (q k): no Mul in the graph
            for kind in ("weight", "bias"):
                tensor = weights[f"{source}attention.self.{part}.{kind}"][heads_cols]
                shard[f"{target}attention.{part}.{kind}"] = tensor * scale
        shard[f"{target}attention.output.weight"] = weights[f"{source}attention.output.dense.weight"][:, heads_cols]
        shard[f"{target}attention.output.bias"] = weights[f"{source}attention.output.dense.bias"]
        shard[f"{target}attention_norm.weight"] = weights[f"{source}attention.output.LayerNorm.weight"]
        shard[f"{target}attention_norm.bias"] = weights[f"{source}attention.output.LayerNorm.bias"]
        shard[f"{target}mlp.up.weight"] = weights[f"{source}intermediate.dense.weight"][inter_cols]
        shard[f"{target}mlp.up.bias"] = weights[f"{source}intermediate.dense.bias"][inter_cols]
        shard[f"{target}mlp.down.weight"] = weights[f"{source}output.dense.weight"][:, inter_cols]
        shard[f"{target}mlp.down.bias"] = weights[f"{source}output.dense.bias"]
        shard[f"{target}mlp_norm.weight"] = weights[f"{source}output.LayerNorm.weight"]
        shard[f"{target}mlp_norm.bias"] = weights[f"{source}output.LayerNorm.bias"]
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in shard.items()}


def build_stage_cell(weights: dict[str, np.ndarray], stage: int, stage_size: int, tp_rank: int, tp: int) -> Any:
    """The Cell of one rank: stage `stage` of `stage_size`, tensor-parallel rank `tp_rank` of `tp`."""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops

    shard = shard_weights(weights, stage, stage_size, tp_rank, tp)

    def param(name: str) -> Parameter:
        return Parameter(Tensor(shard[name]), name=name)

    class Linear(nn.Cell):
        """x @ W.T (+ b) on the stage's flat [batch * length, in] states: MatMul + bias Add, no reshapes (and not
        `ops.dense`, 1.7x slower on CPU). Row-parallel: the partial products are summed over the stage before the
        bias."""

        def __init__(self, prefix: str, reduce: bool) -> None:
            super().__init__()
            self.weight = param(f"{prefix}.weight")
            self.bias = param(f"{prefix}.bias")
            self.all_reduce = ops.AllReduce(group=WORLD_GROUP) if reduce and tp > 1 else None
            self.matmul = ops.MatMul(transpose_b=True)

        def construct(self, x):
            y = self.matmul(x, self.weight)
            if self.all_reduce is not None:
                y = self.all_reduce(y)
            return y + self.bias

    class LayerNorm(nn.Cell):
        """One LayerNorm kernel (the explicit mean/variance form was 7)."""

        def __init__(self, prefix: str) -> None:
            super().__init__()
            self.weight = param(f"{prefix}.weight")
            self.bias = param(f"{prefix}.bias")
            self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=LAYER_NORM_EPS)

        def construct(self, x):
            return self.norm(x, self.weight, self.bias)[0]

    class Attention(nn.Cell):
        """This rank's 12/tp heads; the output projection is row-parallel. The 1/sqrt(head_dim) score scale is
        folded into the query weights at export (`shard_weights`), so it costs no kernel."""

        def __init__(self, prefix: str) -> None:
            super().__init__()
            self.heads = HEADS // tp
            self.query = Linear(f"{prefix}.query", reduce=False)
            self.key = Linear(f"{prefix}.key", reduce=False)
            self.value = Linear(f"{prefix}.value", reduce=False)
            self.output = Linear(f"{prefix}.output", reduce=True)
            self.scores = ops.BatchMatMul(transpose_b=True)
            self.context = ops.BatchMatMul()

        def split_heads(self, x, batch, length):
            return ops.transpose(ops.reshape(x, (batch, length, self.heads, HEAD_DIM)), (0, 2, 1, 3))

        def construct(self, hidden, mask_bias, batch, length):
            query = self.split_heads(self.query(hidden), batch, length)
            key = self.split_heads(self.key(hidden), batch, length)
            value = self.split_heads(self.value(hidden), batch, length)
            probabilities = ops.softmax(self.scores(query, key) + mask_bias, -1)
            context = ops.transpose(self.context(probabilities, value), (0, 2, 1, 3))
            return self.output(ops.reshape(context, (batch * length, self.heads * HEAD_DIM)))

    class Mlp(nn.Cell):
        """This rank's 1536/tp intermediate units; the down-projection is row-parallel."""

        def __init__(self, prefix: str) -> None:
            super().__init__()
            self.up = Linear(f"{prefix}.up", reduce=False)
            self.down = Linear(f"{prefix}.down", reduce=True)

        def construct(self, x):
            up = self.up(x)
            return self.down(0.5 * up * (1.0 + ops.erf(up * (1.0 / math.sqrt(2.0)))))

    class Layer(nn.Cell):
        def __init__(self, prefix: str) -> None:
            super().__init__()
            self.attention = Attention(f"{prefix}.attention")
            self.attention_norm = LayerNorm(f"{prefix}.attention_norm")
            self.mlp = Mlp(f"{prefix}.mlp")
            self.mlp_norm = LayerNorm(f"{prefix}.mlp_norm")

        def construct(self, hidden, mask_bias, batch, length):
            hidden = self.attention_norm(hidden + self.attention(hidden, mask_bias, batch, length))
            return self.mlp_norm(hidden + self.mlp(hidden))

    class Embeddings(nn.Cell):
        """Word + absolute position (0..L-1) + token type 0, then LayerNorm."""

        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = param("embeddings.word_embeddings")
            self.position_embeddings = param("embeddings.position_embeddings")
            self.token_type_embedding = param("embeddings.token_type_embedding")
            self.norm = LayerNorm("embeddings.norm")

        def construct(self, input_ids):
            position_ids = ops.cumsum(ops.ones_like(input_ids), 1) - 1
            embedded = ops.gather(self.word_embeddings, input_ids, 0)
            embedded = embedded + ops.gather(self.position_embeddings, position_ids, 0)
            return self.norm(embedded + self.token_type_embedding)

    class Stage(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.first = stage == 0
            self.last = stage == stage_size - 1
            self.embeddings = Embeddings() if self.first else None
            self.layers = nn.CellList([Layer(f"layers.{i}") for i in range(len(stage_layers(stage, stage_size)))])

        def construct(self, first_input, attention_mask):
            hidden = self.embeddings(first_input) if self.first else first_input
            batch, length = ops.shape(attention_mask)  # once per stage: each dynamic shape read is a kernel
            mask_bias = (1.0 - ops.cast(attention_mask, ms.float32)) * MASKED_SCORE
            mask_bias = ops.reshape(mask_bias, (batch, 1, 1, length))
            hidden = ops.reshape(hidden, (batch * length, HIDDEN))  # flat through the stage: no per-Linear reshapes
            for layer in self.layers:
                hidden = layer(hidden, mask_bias, batch, length)
            hidden = ops.reshape(hidden, (batch, length, HIDDEN))
            if self.last:
                return hidden
            return hidden, attention_mask

    cell = Stage()
    names = {p.name for p in cell.get_parameters()}
    if names != set(shard):
        raise AssertionError(f"parameters and shard differ: {sorted(names ^ set(shard))}")
    return cell
