"""The GPT example as MindSpore cells, one per rank: stages of layers (pipeline) x heads and MLP units (tensor).

Semi-auto parallel does not shard on CPU, so each rank's Cell is built from its own slice of the weights:

- pipeline: the n_layers are split evenly over `stage_size` stages; stage 0 also holds the token and position
  embeddings, the last stage the final LayerNorm and the LM head (the token embedding, tied). Activations cross
  stages outside the graph (zmserve moves them).
- tensor parallel, Megatron style, over the `tp` ranks of a stage: rank t keeps heads [t*H/tp, (t+1)*H/tp) of the
  fused Q/K/V projection (column-parallel) and the matching input columns of the output projection (row-parallel),
  and units [t*d_ff/tp, ...) of the MLP up-projection with the matching input columns of the down-projection. Each
  row-parallel product is a partial sum: an AllReduce on the stage's world group adds them, then the bias is added
  once. With tp == 1 the graph holds no collective, so it runs in a process that is in no group.

Each exported graph is a pure function of (tokens or hidden, positions, kv): the attention cache is an explicit
input, and the K/V of this call's tokens an explicit output (`kv_new`) that the caller writes into its cache (see
generation-contract.md and examples/gpt/README.md). The same Cell serves both subgraphs: `incremental=True` (one new
token per row) leaves out the causal mask among the new tokens and the pick of the last token, which T = 1 makes
unnecessary. Nothing here runs an op the math does not need: the 1/sqrt(head_dim) scale is folded into the Q
weights and GELU's constants into the MLP weights, Q/K/V are one MatMul, LayerNorm is MindSpore's fused kernel.

Layout of one rank's call (B rows, T new tokens per row, M = max_len, L = this stage's layers, Hr = this rank's
heads, D = head dim): attention of row b's new token t sees cache slots j < positions[b] (what earlier calls
wrote) and new tokens t' <= t. The cache's scores and the new tokens' scores are computed apart (no copy of the
cache) and softmaxed together.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS = Path(__file__).resolve().parent / "weights"
WORLD_GROUP = "mccl_world_group"
"""MindSpore's CPU collectives group, named explicitly: exported outside a group, the default would be HCCL's."""
MASKED_SCORE = -1e9
"""Added to the score of a key a query must not see; exp() of it is exactly 0 in float32."""


def load_config(weights_dir: Path = WEIGHTS) -> dict[str, Any]:
    return json.loads((weights_dir / "config.json").read_text())


def load_weights(weights_dir: Path = WEIGHTS) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(weights_dir / "weights.safetensors"))


def check_layout(config: Mapping[str, Any], rank_size: int, stage_size: int) -> int:
    """The tensor-parallel size of a (rank_size, stage_size) layout, or ValueError if it does not fit the model."""
    if rank_size < 1 or stage_size < 1 or rank_size % stage_size:
        raise ValueError(f"rank_size {rank_size} must be a positive multiple of stage_size {stage_size}")
    if config["n_layers"] % stage_size:
        raise ValueError(f"stage_size {stage_size} must divide the {config['n_layers']} layers")
    tp = rank_size // stage_size
    if config["n_heads"] % tp or config["d_ff"] % tp:
        raise ValueError(f"the tensor-parallel size {tp} (rank_size / stage_size) must divide the "
                         f"{config['n_heads']} heads and the {config['d_ff']} MLP units")
    return tp


def stage_layers(config: Mapping[str, Any], stage: int, stage_size: int) -> range:
    per_stage = config["n_layers"] // stage_size
    return range(stage * per_stage, (stage + 1) * per_stage)


def shard_weights(weights: Mapping[str, np.ndarray], config: Mapping[str, Any], stage: int, stage_size: int,
                  tp_rank: int, tp: int) -> dict[str, np.ndarray]:
    """The tensors one rank holds, sliced and laid out for its Cell ([in, out] for MatMul without transpose).

    qkv: [d_model, 3 * Hr * D], columns (q heads, k heads, v heads) of this rank, q pre-scaled by 1/sqrt(D).
    """
    d_model, heads, d_ff = config["d_model"], config["n_heads"], config["d_ff"]
    head_dim = d_model // heads
    cols = slice(tp_rank * d_model // tp, (tp_rank + 1) * d_model // tp)  # this rank's heads, as features
    units = slice(tp_rank * d_ff // tp, (tp_rank + 1) * d_ff // tp)
    scale = 1.0 / math.sqrt(head_dim)
    shard: dict[str, np.ndarray] = {}
    if stage == 0:
        shard["wte"] = weights["wte"]
        shard["wpe"] = weights["wpe"]
    for position, layer in enumerate(stage_layers(config, stage, stage_size)):
        source, target = f"layers.{layer}.", f"layers.{position}."
        shard[target + "ln_1.gamma"] = weights[source + "ln_1.weight"]
        shard[target + "ln_1.beta"] = weights[source + "ln_1.bias"]
        w = {n: weights[f"{source}attn.{n}.weight"][cols] for n in "qkv"}  # [Hr*D, d_model] ([out, in])
        b = {n: weights[f"{source}attn.{n}.bias"][cols] for n in "qkv"}
        shard[target + "qkv.weight"] = np.concatenate([w["q"] * scale, w["k"], w["v"]]).T
        shard[target + "qkv.bias"] = np.concatenate([b["q"] * scale, b["k"], b["v"]])
        shard[target + "o.weight"] = weights[source + "attn.o.weight"][:, cols].T
        shard[target + "o.bias"] = weights[source + "attn.o.bias"]
        shard[target + "ln_2.gamma"] = weights[source + "ln_2.weight"]
        shard[target + "ln_2.beta"] = weights[source + "ln_2.bias"]
        # GELU(u) = 0.5 u (1 + erf(u / sqrt 2)) = (u' (1 + erf(u'))) / sqrt 2 with u' = u / sqrt 2: both scales
        # go into the weights, so the graph computes u' * (1 + erf(u')) (3 kernels instead of 5)
        shard[target + "up.weight"] = weights[source + "mlp.up.weight"][units].T / math.sqrt(2.0)
        shard[target + "up.bias"] = weights[source + "mlp.up.bias"][units] / math.sqrt(2.0)
        shard[target + "down.weight"] = weights[source + "mlp.down.weight"][:, units].T / math.sqrt(2.0)
        shard[target + "down.bias"] = weights[source + "mlp.down.bias"]
    if stage == stage_size - 1:
        shard["ln_f.gamma"] = weights["ln_f.weight"]
        shard["ln_f.beta"] = weights["ln_f.bias"]
        shard["lm_head"] = weights["wte"].T  # tied: [d_model, vocab]
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in shard.items()}


def build_stage_cell(weights: Mapping[str, np.ndarray], config: Mapping[str, Any], stage: int, stage_size: int,
                     tp_rank: int, tp: int, incremental: bool, in_graph_slots: int = 0) -> Any:
    """The Cell of one rank: stage `stage` of `stage_size`, tensor-parallel rank `tp_rank` of `tp`; with
    `incremental` the one-token-per-row decode graph, else the full graph over a chunk of T tokens per row.

    `in_graph_slots` > 0 builds the alternative the contract did NOT choose, kept to measure it
    (benchmarks/generation_model.py): the cache lives in the graph as Parameters [slots, Hr, M, D] per layer and
    K/V, the call takes (tokens, positions, slots) with slots[b] the cache row of row b, reads the rows with a
    Gather and writes the new K/V with ScatterNdUpdate. Only for a one-stage incremental graph.
    """
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops

    shard = shard_weights(weights, config, stage, stage_size, tp_rank, tp)
    d_model, max_len = config["d_model"], config["max_len"]
    heads = config["n_heads"] // tp
    head_dim = d_model // config["n_heads"]
    n_layers = len(stage_layers(config, stage, stage_size))
    first, last = stage == 0, stage == stage_size - 1

    def param(name: str) -> Parameter:
        return Parameter(Tensor(shard[name]), name=name)

    class LayerNorm(nn.Cell):
        def __init__(self, prefix: str) -> None:
            super().__init__()
            self.gamma = param(f"{prefix}.gamma")
            self.beta = param(f"{prefix}.beta")
            self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=config["layer_norm_eps"])

        def construct(self, x):
            return self.norm(x, self.gamma, self.beta)[0]

    class Linear(nn.Cell):
        """x [N, in] @ W [in, out] + b; row-parallel (`reduce`): the partial products summed over the stage first."""

        def __init__(self, prefix: str, reduce: bool) -> None:
            super().__init__()
            self.weight = param(f"{prefix}.weight")
            self.bias = param(f"{prefix}.bias")
            self.matmul = ops.MatMul()
            self.all_reduce = ops.AllReduce(group=WORLD_GROUP) if reduce and tp > 1 else None

        def construct(self, x):
            y = self.matmul(x, self.weight)
            if self.all_reduce is not None:
                y = self.all_reduce(y)
            return y + self.bias

    class Layer(nn.Cell):
        def __init__(self, prefix: str) -> None:
            super().__init__()
            self.ln_1 = LayerNorm(f"{prefix}.ln_1")
            self.qkv = Linear(f"{prefix}.qkv", reduce=False)
            self.o = Linear(f"{prefix}.o", reduce=True)
            self.ln_2 = LayerNorm(f"{prefix}.ln_2")
            self.up = Linear(f"{prefix}.up", reduce=False)
            self.down = Linear(f"{prefix}.down", reduce=True)
            self.scores = ops.BatchMatMul(transpose_b=True)
            self.context = ops.BatchMatMul()

        def construct(self, x, k_cache, v_cache, cache_bias, new_bias, batch, length):
            """x [B*T, d_model]; k/v_cache [B, Hr, M, D]; cache_bias [B, 1, 1, M]; new_bias [T, T] or None."""
            qkv = ops.reshape(self.qkv(self.ln_1(x)), (batch, length, 3, heads, head_dim))
            q, k, v = ops.unstack(ops.transpose(qkv, (2, 0, 3, 1, 4)), 0)  # each [B, Hr, T, D]
            scores_new = self.scores(q, k)
            if new_bias is not None:
                scores_new = scores_new + new_bias
            scores = ops.concat((self.scores(q, k_cache) + cache_bias, scores_new), -1)
            probs = ops.softmax(scores, -1)
            context = self.context(probs[..., :max_len], v_cache) + self.context(probs[..., max_len:], v)
            context = ops.reshape(ops.transpose(context, (0, 2, 1, 3)), (-1, heads * head_dim))
            x = x + self.o(context)
            up = self.up(self.ln_2(x))  # already scaled by 1/sqrt 2 (shard_weights)
            x = x + self.down(up * (1.0 + ops.erf(up)))
            return x, k, v

    class Stage(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            if first:
                self.wte = param("wte")
                self.wpe = param("wpe")
            self.layers = nn.CellList([Layer(f"layers.{i}") for i in range(n_layers)])
            if last:
                self.ln_f = LayerNorm("ln_f")
                self.lm_head = param("lm_head")
                self.matmul = ops.MatMul()
            self.slots = Tensor(np.arange(max_len, dtype=np.int32).reshape(1, max_len))
            if in_graph_slots:
                if not (incremental and first and last):
                    raise ValueError("in-graph state is built for a one-stage incremental graph only")
                zeros = np.zeros((in_graph_slots, heads, max_len, head_dim), np.float32)
                self.cache = ms.ParameterTuple(Parameter(Tensor(zeros), name=f"cache.{i}", requires_grad=False)
                                               for i in range(2 * n_layers))
                self.head_index = Tensor(np.arange(heads, dtype=np.int32).reshape(1, heads))

        def construct(self, data, positions, kv):
            """kv: the state input, or (in-graph state) each row's cache slot [B]."""
            if first:
                batch, length = ops.shape(data)
            else:
                batch, length, _ = ops.shape(data)
            # cache slot j of row b holds an earlier token iff j < positions[b]
            masked = ops.cast(self.slots >= ops.expand_dims(positions, 1), ms.float32) * MASKED_SCORE
            cache_bias = ops.reshape(masked, (batch, 1, 1, max_len))
            new_bias = None
            if incremental:
                if first:
                    x = ops.gather(self.wte, ops.reshape(data, (-1,)), 0) + ops.gather(self.wpe, positions, 0)
                else:
                    x = ops.reshape(data, (-1, d_model))
            else:
                offsets = ops.arange(length, dtype=ms.int32)
                new_bias = ops.cast(ops.expand_dims(offsets, 0) > ops.expand_dims(offsets, 1),
                                    ms.float32) * MASKED_SCORE
                if first:
                    token_positions = ops.expand_dims(positions, 1) + ops.expand_dims(offsets, 0)
                    x = ops.gather(self.wte, data, 0) + ops.gather(self.wpe, token_positions, 0)
                    x = ops.reshape(x, (-1, d_model))
                else:
                    x = ops.reshape(data, (-1, d_model))
            if in_graph_slots:
                caches = [ops.gather(cache, kv, 0) for cache in self.cache]
            else:
                caches = ops.unstack(ops.reshape(kv, (2 * n_layers, batch, heads, max_len, head_dim)), 0)
            new = []
            for i, layer in enumerate(self.layers):
                x, k, v = layer(x, caches[2 * i], caches[2 * i + 1], cache_bias, new_bias, batch, length)
                new.append(ops.expand_dims(k, 0))
                new.append(ops.expand_dims(v, 0))
            if in_graph_slots:
                # row b's new K/V go to (slots[b], head h, positions[b]) of every cache: indices [B*Hr, 3]
                zero = self.head_index * 0
                index = ops.concat((ops.expand_dims(ops.expand_dims(kv, 1) + zero, -1),
                                    ops.expand_dims(ops.expand_dims(kv, 1) * 0 + self.head_index, -1),
                                    ops.expand_dims(ops.expand_dims(positions, 1) + zero, -1)), -1)
                index = ops.reshape(index, (-1, 3))
                written = [ops.scatter_nd_update(self.cache[i], index, ops.reshape(new[i], (-1, head_dim)))
                           for i in range(2 * n_layers)]
                logits = self.matmul(self.ln_f(x), self.lm_head)
                return ops.depend(logits, written)
            # concat, not ops.stack: a loaded MindIR's Stack keeps the output shape of its first call (2.10)
            kv_new = ops.reshape(ops.concat(new, 0), (n_layers, 2, batch, heads, length, head_dim))
            if not last:
                return ops.reshape(x, (batch, length, d_model)), positions, kv_new
            if not incremental:
                x = ops.reshape(x, (batch, length, d_model))[:, -1]
            return self.matmul(self.ln_f(x), self.lm_head), kv_new

    cell = Stage()
    names = {p.name for p in cell.get_parameters() if not p.name.startswith("cache.")}
    if names != set(shard):
        raise AssertionError(f"parameters and shard differ: {sorted(names ^ set(shard))}")
    return cell
