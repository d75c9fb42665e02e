"""An independent plain-numpy forward pass of all-MiniLM-L6-v2, to check the sharded MindSpore stages against.

Written from the BERT definition over the unsharded checkpoint, sharing no code with model.py: post-LayerNorm
encoder, exact erf GELU, LayerNorm eps 1e-12, token type 0, absolute positions 0..L-1. Computes in float64 by
default, so the comparison measures MindSpore's float32 error rather than the difference of two float32 orders.
Then sentence-transformers' pooling: mean of the token states over the attention mask, L2-normalised.
"""

from __future__ import annotations

import math

import numpy as np
from assets import HEADS, LAYER_NORM_EPS, LAYERS, load_weights

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + erf(x / sqrt 2)), with math.erf applied elementwise."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(x.dtype))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + LAYER_NORM_EPS) * weight + bias


class Reference:
    """The whole model in numpy; `hidden_states` is the encoder output, `embed` the normalised sentence vector."""

    def __init__(self, weights: dict[str, np.ndarray] | None = None, dtype: type = np.float64) -> None:
        source = weights if weights is not None else load_weights()
        self.dtype = dtype
        self.w = {name: value.astype(dtype) for name, value in source.items() if value.dtype.kind == "f"}

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def hidden_states(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Token states [B, L, 384] for int token ids and a 0/1 mask, both [B, L]."""
        w = self.w
        batch, length = input_ids.shape
        x = (w["embeddings.word_embeddings.weight"][input_ids]
             + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        # Padding keys get a probability of exactly zero, whatever the scores.
        keep = attention_mask.astype(bool)[:, None, None, :]
        for layer in range(LAYERS):
            p = f"encoder.layer.{layer}."

            def heads(t: np.ndarray) -> np.ndarray:
                return t.reshape(batch, length, HEADS, -1).transpose(0, 2, 1, 3)

            q = heads(self.linear(x, p + "attention.self.query"))
            k = heads(self.linear(x, p + "attention.self.key"))
            v = heads(self.linear(x, p + "attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
            scores = np.where(keep, scores, -np.inf)
            row_max = scores.max(-1, keepdims=True)
            row_max = np.where(np.isfinite(row_max), row_max, 0.0)
            exp = np.where(keep, np.exp(scores - row_max), 0.0)
            total = exp.sum(-1, keepdims=True)
            probabilities = exp / np.where(total > 0, total, 1.0)
            context = (probabilities @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
            x = layer_norm(x + self.linear(context, p + "attention.output.dense"),
                           w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"])
            inner = gelu(self.linear(x, p + "intermediate.dense"))
            x = layer_norm(x + self.linear(inner, p + "output.dense"),
                           w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        return x

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return normalize(mean_pool(self.hidden_states(input_ids, attention_mask), attention_mask))


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean of the token states over the mask, [..., L, H] -> [..., H] (sentence-transformers' clamp at 1e-9)."""
    mask = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * mask).sum(-2) / np.maximum(mask.sum(-2), 1e-9)


def normalize(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis (torch.nn.functional.normalize's eps 1e-12)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def embed_texts(texts: list[str], max_length: int = 256) -> np.ndarray:
    """Each text's embedding from the float64 model, tokenized as the servable does (unpadded, truncated)."""
    import assets
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(assets.model_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    reference = Reference()
    rows = []
    for text in texts:
        ids = np.array(tokenizer.encode(text).ids, np.int64)[None]
        rows.append(reference.embed(ids, np.ones_like(ids))[0])
    return np.stack(rows)
