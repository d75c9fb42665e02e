"""The GPT example's forward pass in float64 numpy, written from weights/config.json and weights.safetensors only.

It shares no code with the MindSpore cells (model.py): it is the independent answer the served tokens are checked
against. Generation uses zmserve/sampling.py, the same sampler the server uses, so a seeded request gives the
same tokens here as served. Each step re-runs the whole sequence (no cache): slow, but nothing to get wrong.

    python examples/gpt/reference.py "ROMEO." --max-tokens 40
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from math import sqrt
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from scipy.special import erf
from tokenizers import Tokenizer

from zmserve.sampling import Sampler, SamplingParams

WEIGHTS = Path(__file__).resolve().parent / "weights"


@dataclass
class Generation:
    token_ids: list[int]
    finish_reason: str  # "stop": the end-of-text token came (not included); "length": max_tokens or max_len


class Reference:
    def __init__(self, weights_dir: Path = WEIGHTS) -> None:
        self.config = json.loads((weights_dir / "config.json").read_text())
        self.weights = {name: value.astype(np.float64)
                        for name, value in load_file(str(weights_dir / "weights.safetensors")).items()}
        self.tokenizer = Tokenizer.from_file(str(weights_dir / "tokenizer.json"))
        self.eos = int(self.config["eos_token_id"])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _layer_norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        centered = x - x.mean(-1, keepdims=True)
        variance = (centered**2).mean(-1, keepdims=True)
        scaled = centered / np.sqrt(variance + self.config["layer_norm_eps"])
        return scaled * self.weights[f"{prefix}.weight"] + self.weights[f"{prefix}.bias"]

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ self.weights[f"{prefix}.weight"].T + self.weights[f"{prefix}.bias"]

    def hidden_states(self, tokens: Sequence[int]) -> list[np.ndarray]:
        """The residual stream [T, d_model] after the embeddings and after each layer (n_layers + 1 arrays)."""
        c, w = self.config, self.weights
        ids = np.asarray(tokens, dtype=np.int64)
        length = ids.size
        if not 0 < length <= c["max_len"]:
            raise ValueError(f"{length} tokens: the model takes 1 to {c['max_len']}")
        heads, head_dim = c["n_heads"], c["d_model"] // c["n_heads"]
        future = np.triu(np.ones((length, length), dtype=bool), 1)
        x = w["wte"][ids] + w["wpe"][:length]
        states = [x]
        for i in range(c["n_layers"]):
            p = f"layers.{i}"
            h = self._layer_norm(x, f"{p}.ln_1")
            q, k, v = (self._linear(h, f"{p}.attn.{n}").reshape(length, heads, head_dim).transpose(1, 0, 2)
                       for n in "qkv")
            scores = q @ k.transpose(0, 2, 1) / sqrt(head_dim)
            scores[:, future] = -np.inf
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            x = x + self._linear((probs @ v).transpose(1, 0, 2).reshape(length, c["d_model"]), f"{p}.attn.o")
            up = self._linear(self._layer_norm(x, f"{p}.ln_2"), f"{p}.mlp.up")
            x = x + self._linear(0.5 * up * (1.0 + erf(up / sqrt(2.0))), f"{p}.mlp.down")
            states.append(x)
        return states

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """[T, vocab]: the next-token logits after every prefix of `tokens`."""
        return self._layer_norm(self.hidden_states(tokens)[-1], "ln_f") @ self.weights["wte"].T

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        """Tokens after `prompt`, chosen by zmserve.sampling, until end-of-text, max_tokens or the context is full."""
        sampler = Sampler(params)
        tokens, generated = list(prompt), []
        while len(generated) < params.max_tokens and len(tokens) < self.config["max_len"]:
            token = sampler.next_token(self.logits(tokens)[-1], generated)
            if token == self.eos:
                return Generation(generated, "stop")
            tokens.append(token)
            generated.append(token)
        return Generation(generated, "length")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    reference = Reference()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    result = reference.generate(reference.encode(args.prompt), params)
    print(args.prompt + reference.decode(result.token_ids))
    print(f"[{len(result.token_ids)} tokens, finish_reason={result.finish_reason}]")


if __name__ == "__main__":
    main()
