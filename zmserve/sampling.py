"""Choosing the next token from a model's logits: the ONE sampler the server and the numpy reference both use.

Written once, in plain numpy, so a seeded request gives the same tokens served (any rank layout) as it does from
`examples/gpt/reference.py`: the only randomness is one `rng.random()` draw per sampled token from
`np.random.default_rng(seed)`, compared against a cumulative distribution built the same way everywhere.

The order of the steps follows PanGu-alpha's serving code (`generate_increment` + `sampler`):
1. penalties on the log-probabilities: `x - count * frequency_penalty - (count > 0) * presence_penalty`, where
   `count` is how often each token was GENERATED so far (the prompt does not count, as in PanGu's frequency_list);
2. temperature 0 -> argmax (greedy; the penalties still apply, as OpenAI's API does);
3. otherwise a softmax of `x / temperature`, then top-k (the k most likely, when `top_k > 0`) and top-p (the
   smallest set of most likely tokens whose mass reaches `top_p`: PanGu keeps the tokens whose running sum is below
   `top_p` plus one more), renormalised, and one draw. PanGu uses top-p OR top-k; here both may apply (top-k
   first), which is the same whenever only one of them is set.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np


class SamplingParams(msgspec.Struct, frozen=True):
    """How a request wants its tokens chosen; the defaults are greedy decoding of 16 tokens.

    Out-of-range values raise ValueError at construction (msgspec.ValidationError when decoded), so the caller can
    answer INVALID_ARGUMENT before any model call.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (np.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be in [0, 2**63) or None, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """One sequence's token chooser: owns its random generator, so each sequence is reproducible on its own."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def next_token(self, logits: np.ndarray, generated: Sequence[int]) -> int:
        """The next token id, given this step's logits (vocab,) and the tokens generated so far (not the prompt)."""
        p = self.params
        x = np.asarray(logits, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(x)):
            raise ValueError("logits contain NaN or infinity")
        x = x - _logsumexp(x)  # log-probabilities, as PanGu's penalties are applied to
        if generated and (p.frequency_penalty or p.presence_penalty):
            counts = np.bincount(np.asarray(generated, dtype=np.int64), minlength=x.size)[: x.size]
            x = x - counts * p.frequency_penalty - (counts > 0) * p.presence_penalty
        if p.greedy:
            return int(np.argmax(x))
        return int(self._draw(x / p.temperature))

    def _draw(self, scaled: np.ndarray) -> int:
        order = np.argsort(-scaled, kind="stable")  # most likely first; ties keep the lower token id first
        if self.params.top_k:
            order = order[: self.params.top_k]
        kept = scaled[order]
        probs = np.exp(kept - kept[0])
        probs /= probs.sum()
        if self.params.top_p < 1.0:
            below = int(np.count_nonzero(np.cumsum(probs) < self.params.top_p))
            probs = probs[: below + 1]
            order = order[: below + 1]
            probs = probs / probs.sum()
        cdf = np.cumsum(probs)
        cdf[-1] = 1.0  # rounding must never leave the draw past the end
        return order[int(np.searchsorted(cdf, self.rng.random(), side="right"))]


def _logsumexp(x: np.ndarray) -> float:
    top = float(x.max())
    return top + float(np.log(np.exp(x - top).sum()))
