"""The big model in plain numpy, float64, one layer at a time: what the served shards are checked against.

Written from the definition in weights.py's docstring, sharing no code with model.py (the MindSpore Cells).
Each layer's weights are regenerated from the seed when the layer runs and dropped after it, so the whole
model is never in memory (one layer of the full preset: 201 MB of float32). Computing in float64 makes the
comparison measure MindSpore's float32 error rather than the difference of two float32 orders.

    python reference.py --preset small --seed 0     # prints the output's checksum and the time taken
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from weights import LAYER_NORM_EPS, PRESETS, Dims, tensor


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + LAYER_NORM_EPS) * gamma + beta


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def encoder_layer(x: np.ndarray, w: dict[str, np.ndarray], dims: Dims) -> np.ndarray:
    """One pre-LN layer on x [batch, seq, hidden]."""
    batch, length, hidden = x.shape

    def heads(t: np.ndarray) -> np.ndarray:
        return t.reshape(batch, length, dims.heads, dims.head_dim).transpose(0, 2, 1, 3)

    a = layer_norm(x, w["ln1.gamma"], w["ln1.beta"])
    q, k, v = (heads(a @ w[f"{n}.weight"] + w[f"{n}.bias"]) for n in ("q", "k", "v"))
    attention = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(dims.head_dim)) @ v
    x = x + attention.transpose(0, 2, 1, 3).reshape(batch, length, hidden) @ w["o.weight"] + w["o.bias"]
    m = layer_norm(x, w["ln2.gamma"], w["ln2.beta"])
    return x + gelu_tanh(m @ w["up.weight"] + w["up.bias"]) @ w["down.weight"] + w["down.bias"]


def forward(x: np.ndarray, dims: Dims, seed: int, layers: range | None = None, final: bool = True) -> np.ndarray:
    """The model on x [batch, seq, hidden] (float64 out); `layers`/`final` select a part (one stage)."""
    h = np.asarray(x, dtype=np.float64)
    for layer in layers if layers is not None else range(dims.layers):
        weights = {name: tensor(seed, dims, layer, name).astype(np.float64) for name, _, _ in dims.tensors(layer)}
        h = encoder_layer(h, weights, dims)
        del weights
    if final:
        h = layer_norm(h, tensor(seed, dims, dims.layers, "final_ln.gamma").astype(np.float64),
                       tensor(seed, dims, dims.layers, "final_ln.beta").astype(np.float64))
    return h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq", type=int, default=8)
    args = parser.parse_args()
    dims = PRESETS[args.preset]
    x = np.random.default_rng(1234).standard_normal((1, args.seq, dims.hidden)).astype(np.float32)
    started = time.perf_counter()
    y = forward(x, dims, args.seed)
    print(f"output {y.shape}, sum {y.sum():.6f}, |y| max {np.abs(y).max():.4f}, "
          f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
