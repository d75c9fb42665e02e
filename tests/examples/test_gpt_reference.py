"""The GPT example's float64 numpy reference: its forward pass against an independent one-token computation, its
causality, that the committed weights learned text, and generation with the shared sampler."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from zmserve.sampling import Sampler, SamplingParams

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpt"


def load_gpt_module(name: str) -> ModuleType:
    """examples/gpt/<name>.py as module gpt_<name> (examples/minilm has modules of the same names)."""
    module_name = f"gpt_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        sys.modules[module_name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[module_name]
SONNET = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
          "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n")


@pytest.fixture(scope="module")
def reference():
    return load_gpt_module("reference").Reference()


def one_token_logits(reference, token: int) -> np.ndarray:
    """A single token attends only to itself (softmax over one score is 1), so each layer is
    x + o(v(ln_1 x)) then x + mlp(ln_2 x): written out here with plain loops over the weights."""
    c, w = reference.config, reference.weights

    def norm(x, name):
        mean = sum(x) / len(x)
        var = sum((value - mean) ** 2 for value in x) / len(x)
        return np.array([(value - mean) / np.sqrt(var + c["layer_norm_eps"]) for value in x]) \
            * w[f"{name}.weight"] + w[f"{name}.bias"]

    def gelu(x):
        from math import erf, sqrt

        return np.array([0.5 * value * (1 + erf(value / sqrt(2))) for value in x])

    x = w["wte"][token] + w["wpe"][0]
    for i in range(c["n_layers"]):
        p = f"layers.{i}"
        value = w[f"{p}.attn.v.weight"] @ norm(x, f"{p}.ln_1") + w[f"{p}.attn.v.bias"]
        x = x + w[f"{p}.attn.o.weight"] @ value + w[f"{p}.attn.o.bias"]
        up = w[f"{p}.mlp.up.weight"] @ norm(x, f"{p}.ln_2") + w[f"{p}.mlp.up.bias"]
        x = x + w[f"{p}.mlp.down.weight"] @ gelu(up) + w[f"{p}.mlp.down.bias"]
    return w["wte"] @ norm(x, "ln_f")


def test_config_and_weights_agree(reference):
    c, w = reference.config, reference.weights
    assert w["wte"].shape == (c["vocab_size"], c["d_model"])
    assert w["wpe"].shape == (c["max_len"], c["d_model"])
    assert w["layers.0.mlp.up.weight"].shape == (c["d_ff"], c["d_model"])
    assert len([n for n in w if n.endswith("attn.q.weight")]) == c["n_layers"]
    assert reference.tokenizer.get_vocab_size() == c["vocab_size"]


@pytest.mark.parametrize("token", [0, 17, 1000])
def test_one_token_matches_an_independent_computation(reference, token):
    np.testing.assert_allclose(reference.logits([token])[0], one_token_logits(reference, token), rtol=0, atol=1e-9)


def test_a_position_sees_no_later_token(reference):
    tokens = reference.encode(SONNET)[:40]
    full = reference.logits(tokens)
    np.testing.assert_allclose(reference.logits(tokens[:25]), full[:25], rtol=0, atol=1e-9)
    changed = reference.logits([*tokens[:25], (tokens[25] + 1) % 2048, *tokens[26:]])
    np.testing.assert_allclose(changed[:25], full[:25], rtol=0, atol=1e-9)
    assert np.abs(changed[25:] - full[25:]).max() > 1e-3


def test_the_weights_learned_text(reference):
    """Shakespeare costs far fewer nats per token than uniform (ln 2048 = 7.6) and than the same tokens shuffled."""
    tokens = reference.encode(SONNET)

    def nll(ids):
        logits = reference.logits(ids)[:-1]
        logits = logits - logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -float(np.mean(log_probs[np.arange(len(ids) - 1), ids[1:]]))

    shuffled = list(np.random.default_rng(0).permutation(tokens))
    assert nll(tokens) < 5.0
    assert nll(shuffled) > nll(tokens) + 1.5


def test_greedy_is_the_argmax_chain(reference):
    prompt = reference.encode("KING HENRY.\n")
    result = reference.generate(prompt, SamplingParams(max_tokens=12))
    tokens = list(prompt)
    for token in result.token_ids:
        assert token == int(np.argmax(reference.logits(tokens)[-1]))
        tokens.append(token)
    assert result.finish_reason == "length" and len(result.token_ids) == 12


def test_greedy_with_a_repetition_penalty_reads_as_text(reference):
    """Plain greedy decoding of this toy model soon loops on a phrase (README.md); with PanGu's penalties on
    repeated tokens it keeps writing other words."""
    params = SamplingParams(max_tokens=30, frequency_penalty=0.5, presence_penalty=0.5)
    text = reference.decode(reference.generate(reference.encode("ROMEO.\n"), params).token_ids)
    assert sum(ch.isalpha() or ch in " \n,.;:'!?[]" for ch in text) >= 0.9 * len(text), text
    assert len(set(re.findall(r"[A-Za-z']{2,}", text))) >= 5, text  # words, not a loop of one


def test_seeded_sampling_repeats_and_differs_by_seed(reference):
    prompt = reference.encode("To be")
    first = reference.generate(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=3))
    again = reference.generate(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=3))
    other = reference.generate(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=4))
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids
    sampler, tokens = Sampler(SamplingParams(max_tokens=10, temperature=1.0, seed=3)), list(prompt)
    for token in first.token_ids:  # the same draws as the shared sampler over the reference's logits
        assert sampler.next_token(reference.logits(tokens)[-1], tokens[len(prompt):]) == token
        tokens.append(token)


def test_generation_stops_at_max_len(reference):
    max_len = reference.config["max_len"]
    prompt = (reference.encode(SONNET) * 20)[: max_len - 3]
    result = reference.generate(prompt, SamplingParams(max_tokens=10))
    assert len(result.token_ids) == 3 and result.finish_reason == "length"
    with pytest.raises(ValueError):
        reference.logits(prompt * 2)
