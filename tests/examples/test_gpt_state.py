"""How examples/gpt/direct.py keeps each sequence's attention state (as an agent keeps it): stack along the batch
axis, write kv_new at each row's own positions, free on release. No MindSpore here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpt"


def load_direct():
    if "gpt_direct" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpt_direct", EXAMPLE / "direct.py")
        assert spec is not None and spec.loader is not None
        sys.modules["gpt_direct"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpt_direct"]


SPEC = {"name": "kv", "dtype": "float32", "shape": [2, 2, 3, 8, 4], "batch_axis": 2, "time_axis": 4,
        "update": "kv_new", "positions": "positions"}


def test_new_sequences_start_as_zeros_stacked_on_the_batch_axis():
    states = load_direct().SequenceStates(SPEC)
    stacked = states.stacked([5, 9])
    assert stacked.shape == (2, 2, 2, 3, 8, 4) and stacked.dtype == np.float32 and not stacked.any()
    assert set(states.arrays) == {5, 9}


def test_update_writes_each_row_at_its_own_positions():
    states = load_direct().SequenceStates(SPEC)
    states.stacked([1, 2])
    update = np.random.default_rng(0).normal(size=(2, 2, 2, 3, 3, 4)).astype(np.float32)  # B=2, T=3
    states.update([1, 2], update, np.array([0, 4], np.int32))
    np.testing.assert_array_equal(states.arrays[1][:, :, :, 0:3], update[:, :, 0])
    assert not states.arrays[1][:, :, :, 3:].any()
    np.testing.assert_array_equal(states.arrays[2][:, :, :, 4:7], update[:, :, 1])
    assert not states.arrays[2][:, :, :, :4].any() and not states.arrays[2][:, :, :, 7:].any()
    # the next call sees what the last one wrote, in the order the rows are asked for
    np.testing.assert_array_equal(states.stacked([2, 1])[:, :, 0], states.arrays[2])


def test_an_update_past_the_end_is_refused_and_release_frees():
    states = load_direct().SequenceStates(SPEC)
    states.stacked([1])
    with pytest.raises(ValueError, match="do not fit"):
        states.update([1], np.zeros((2, 2, 1, 3, 2, 4), np.float32), np.array([7], np.int32))
    states.release([1, 42])
    assert states.arrays == {}
