"""The shared sampler: greedy, temperature, top-k, top-p, penalties, and seeded reproducibility."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from zmserve.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05]))


def draws(params: SamplingParams, logits: np.ndarray, n: int) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler.next_token(logits, []) for _ in range(n)])


def test_defaults_are_greedy_argmax():
    rng = np.random.default_rng(0)
    sampler = Sampler(SamplingParams())
    for _ in range(20):
        logits = rng.normal(size=97)
        assert sampler.next_token(logits, [1, 2, 3]) == int(np.argmax(logits))


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = np.random.default_rng(1).normal(size=50)
    params = SamplingParams(temperature=1.0, seed=1234)
    first = draws(params, logits, 40)
    assert np.array_equal(first, draws(params, logits, 40))
    assert not np.array_equal(first, draws(SamplingParams(temperature=1.0, seed=4321), logits, 40))


def test_unseeded_samplers_differ():
    logits = np.zeros(1000)
    params = SamplingParams(temperature=1.0)
    assert not np.array_equal(draws(params, logits, 20), draws(params, logits, 20))


def test_temperature_one_follows_the_softmax():
    counts = np.bincount(draws(SamplingParams(temperature=1.0, seed=7), LOGITS, 20000), minlength=4) / 20000
    assert np.allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_low_temperature_sharpens_high_temperature_flattens():
    cold = np.bincount(draws(SamplingParams(temperature=0.25, seed=3), LOGITS, 4000), minlength=4) / 4000
    hot = np.bincount(draws(SamplingParams(temperature=4.0, seed=3), LOGITS, 4000), minlength=4) / 4000
    assert cold[0] > 0.85
    assert hot[3] > 0.15
    # exact tempered softmax for the cold case: p_i^4 normalised
    expect = np.array([0.5, 0.3, 0.15, 0.05]) ** 4
    assert abs(cold[0] - expect[0] / expect.sum()) < 0.02


def test_top_k_keeps_only_the_k_most_likely():
    out = draws(SamplingParams(temperature=1.0, top_k=2, seed=5), LOGITS, 3000)
    assert set(out.tolist()) == {0, 1}
    assert abs(np.mean(out == 0) - 0.5 / 0.8) < 0.03
    assert set(draws(SamplingParams(temperature=50.0, top_k=1, seed=5), LOGITS, 200).tolist()) == {0}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # running sums 0.5, 0.8, 0.95, 1.0: p=0.7 keeps {0, 1}; p=0.5 keeps {0, 1} (0.5 is not below 0.5); p=0.4 keeps {0}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=2), LOGITS, 2000).tolist()) == {0, 1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.4, seed=2), LOGITS, 200).tolist()) == {0}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.9, seed=2), LOGITS, 3000).tolist()) == {0, 1, 2}


def test_top_k_then_top_p():
    # top_k=3 renormalises to 0.526, 0.316, 0.158; top_p=0.8 then keeps {0, 1}
    assert set(draws(SamplingParams(temperature=1.0, top_k=3, top_p=0.8, seed=9), LOGITS, 2000).tolist()) == {0, 1}


def test_penalties_count_generated_tokens():
    logits = np.log(np.array([0.55, 0.45 - 1e-9, 1e-9]))  # log-prob gap about 0.2
    gap = float(logits[0] - logits[1])
    greedy = SamplingParams
    assert Sampler(greedy()).next_token(logits, [0, 0, 0]) == 0
    assert Sampler(greedy(presence_penalty=gap + 0.01)).next_token(logits, [0, 0, 0]) == 1
    assert Sampler(greedy(presence_penalty=gap - 0.01)).next_token(logits, [0, 0, 0]) == 0
    assert Sampler(greedy(frequency_penalty=(gap + 0.01) / 3)).next_token(logits, [0, 0, 0]) == 1
    assert Sampler(greedy(frequency_penalty=(gap - 0.01) / 3)).next_token(logits, [0, 0, 0]) == 0
    # a penalty on a token never generated changes nothing
    assert Sampler(greedy(frequency_penalty=5.0, presence_penalty=5.0)).next_token(logits, [2, 2]) == 0


def test_penalty_changes_the_sampled_distribution():
    sampler = Sampler(SamplingParams(temperature=1.0, presence_penalty=np.log(10.0), seed=11))
    out = np.array([sampler.next_token(LOGITS, [0]) for _ in range(5000)])
    weights = np.array([0.05, 0.3, 0.15, 0.05])
    assert abs(np.mean(out == 0) - weights[0] / weights.sum()) < 0.02


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"frequency_penalty": float("inf")},
        {"seed": -1},
    ],
)
def test_out_of_range_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(bad), type=SamplingParams)


def test_non_finite_logits_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        Sampler(SamplingParams()).next_token(np.array([0.0, np.nan]), [])
