"""The big model's dimensions and its weights, generated from a seed one chunk at a time (numpy only).

No checkpoint exists: every tensor is a pure function of (seed, layer, tensor name, chunk). A weight matrix that
tensor parallelism splits is generated as CHUNKS independent chunks along the split axis, so a tp rank (tp
divides CHUNKS) generates exactly its own slice and nothing else, and the numpy reference can rebuild any layer
on its own. Nothing ever needs the whole model in memory: the export streams a rank's tensors to disk and the
reference walks the layers.

Layer l (pre-LayerNorm encoder; x is [batch, seq, hidden], weights are [in, out]):

    a = LN1(x);  x = x + softmax((a Wq + bq)(a Wk + bk)^T / sqrt(head_dim)) (a Wv + bv) Wo + bo   (per head)
    m = LN2(x);  x = x + gelu_tanh(m Wup + bup) Wdown + bdown

and after the last layer a final LayerNorm. Tensor parallelism (Megatron): Wq/Wk/Wv/Wup and their biases by
columns (heads, ffn units), Wo/Wdown by rows; bo, bdown and the LayerNorms are replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNKS = 8
"""Every split tensor is generated in this many chunks along its split axis: tp must divide it (1, 2, 4, 8)."""
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class Dims:
    hidden: int
    heads: int
    ffn: int
    layers: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self, layer: int) -> list[tuple[str, tuple[int, ...], int | None]]:
        """(name, full shape, split axis or None) of every tensor of `layer`; layer == layers is the final LN."""
        d, f = self.hidden, self.ffn
        if layer == self.layers:
            return [("final_ln.gamma", (d,), None), ("final_ln.beta", (d,), None)]
        return [
            ("ln1.gamma", (d,), None), ("ln1.beta", (d,), None),
            ("q.weight", (d, d), 1), ("q.bias", (d,), 0),
            ("k.weight", (d, d), 1), ("k.bias", (d,), 0),
            ("v.weight", (d, d), 1), ("v.bias", (d,), 0),
            ("o.weight", (d, d), 0), ("o.bias", (d,), None),
            ("ln2.gamma", (d,), None), ("ln2.beta", (d,), None),
            ("up.weight", (d, f), 1), ("up.bias", (f,), 0),
            ("down.weight", (f, d), 0), ("down.bias", (d,), None),
        ]

    def parameters(self) -> int:
        return sum(int(np.prod(shape)) for layer in range(self.layers + 1) for _, shape, _ in self.tensors(layer))

    def nbytes(self) -> int:
        return 4 * self.parameters()


PRESETS = {
    # 22 layers x 50.4 M parameters = 1.11e9 parameters, 4.43 GB = 4.13 GiB of float32.
    "full": Dims(hidden=2048, heads=16, ffn=8192, layers=22),
    # The scaled-down copy for the test suite: 4 layers x 12.6 M = 50.4 M parameters, 202 MB. Few layers keep
    # the graph small: an agent compiles it again for every new input shape, holding the GIL meanwhile.
    "small": Dims(hidden=1024, heads=8, ffn=4096, layers=4),
}

_TENSOR_IDS = {name: index for index, (name, _, _) in enumerate(Dims(8, 8, 8, 1).tensors(0))}
_TENSOR_IDS.update({"final_ln.gamma": 100, "final_ln.beta": 101})


def check_layout(dims: Dims, rank_size: int, stage_size: int) -> int:
    """The tensor-parallel size of a layout, or ValueError naming what does not divide."""
    if rank_size < 1 or stage_size < 1 or rank_size % stage_size:
        raise ValueError(f"rank_size {rank_size} must be a positive multiple of stage_size {stage_size}")
    if dims.layers % stage_size:
        raise ValueError(f"stage_size {stage_size} must divide the {dims.layers} layers")
    tp = rank_size // stage_size
    if CHUNKS % tp or dims.heads % CHUNKS or dims.ffn % CHUNKS:
        raise ValueError(f"the tensor-parallel size {tp} must divide {CHUNKS} (the weights' generation chunks)")
    return tp


def stage_layers(dims: Dims, stage: int, stage_size: int) -> range:
    per_stage = dims.layers // stage_size
    return range(stage * per_stage, (stage + 1) * per_stage)


def _chunk(seed: int, dims: Dims, layer: int, name: str, shape: tuple[int, ...], chunk: int) -> np.ndarray:
    """One chunk, from its own random stream: uniform with std 1/sqrt(fan_in) for weights, 1 +- 0.1 for LN
    gains, +-0.02 for biases and LN shifts."""
    rng = np.random.default_rng([seed, layer, _TENSOR_IDS[name], chunk])
    values = rng.random(shape, dtype=np.float32)
    values *= 2
    values -= 1  # uniform [-1, 1), in place: a chunk is up to 64 MB
    if name.endswith(".weight"):
        fan_in = dims.ffn if name == "down.weight" else dims.hidden
        values *= np.float32(np.sqrt(3.0 / fan_in))
    elif name.endswith(".gamma"):
        values *= np.float32(0.1)
        values += 1
    else:
        values *= np.float32(0.02)
    return values


def tensor(seed: int, dims: Dims, layer: int, name: str, tp_rank: int = 0, tp: int = 1) -> np.ndarray:
    """Tensor `name` of `layer` as tp rank `tp_rank` of `tp` holds it (tp=1: the whole tensor), float32."""
    shapes = {n: (shape, axis) for n, shape, axis in dims.tensors(layer)}
    shape, axis = shapes[name]
    if axis is None:
        return _chunk(seed, dims, layer, name, shape, 0)
    chunk_shape = tuple(s // CHUNKS if i == axis else s for i, s in enumerate(shape))
    per_rank = CHUNKS // tp
    chunks = [_chunk(seed, dims, layer, name, chunk_shape, c)
              for c in range(tp_rank * per_rank, (tp_rank + 1) * per_rank)]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=axis)


def shard_shape(dims: Dims, layer: int, name: str, tp: int) -> tuple[int, ...]:
    """The shape of a tp rank's slice of a tensor, without generating it."""
    shape, axis = next((s, a) for n, s, a in dims.tensors(layer) if n == name)
    return tuple(s // tp if i == axis else s for i, s in enumerate(shape))


def rank_nbytes(dims: Dims, rank_size: int, stage_size: int, rank: int) -> int:
    """Bytes of weights one rank holds."""
    tp = check_layout(dims, rank_size, stage_size)
    stage = rank // tp
    layers = list(stage_layers(dims, stage, stage_size))
    if stage == stage_size - 1:
        layers.append(dims.layers)
    return sum(4 * int(np.prod(shard_shape(dims, layer, name, tp))) for layer in layers
               for name, _, _ in dims.tensors(layer))
