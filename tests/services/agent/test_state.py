"""Per-sequence state in the agent (services/agent/state.py) and a rank's subgraph files (subgraphs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zmserve.protocol import ErrorCode, ServingError
from zmserve_services.agent.state import SequenceStates, StateSpec
from zmserve_services.agent.subgraphs import read_subgraphs, subgraph_files

ENTRY = {"name": "kv", "dtype": "float32", "shape": [2, 2, 3, 6, 4], "batch_axis": 2, "time_axis": 4,
         "update": "kv_new", "positions": "positions"}


def test_batch_stacks_sequences_and_update_writes_each_rows_positions() -> None:
    states = SequenceStates(StateSpec.from_config(ENTRY))
    assert states.batch([7, 9]).shape == (2, 2, 2, 3, 6, 4)  # [L, 2, B, H, M, D], new sequences are zeros
    update = np.arange(2 * 2 * 2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 2, 2, 3, 2, 4)  # T = 2
    states.update([7, 9], np.array([0, 3]), update)
    np.testing.assert_array_equal(states.arrays[7][:, :, :, 0:2], update[:, :, 0])
    np.testing.assert_array_equal(states.arrays[9][:, :, :, 3:5], update[:, :, 1])
    assert not states.arrays[7][:, :, :, 2:].any() and not states.arrays[9][:, :, :, :3].any()
    np.testing.assert_array_equal(states.batch([9, 7])[:, :, 0], states.arrays[9])
    assert states.bytes == 2 * 2 * 2 * 3 * 6 * 4 * 4


def test_release_frees_and_the_bound_refuses_one_more() -> None:
    states = SequenceStates(StateSpec.from_config(ENTRY), max_sequences=2)
    states.batch([1, 2])
    with pytest.raises(ServingError) as full:
        states.batch([3])
    assert full.value.code == ErrorCode.RESOURCE_EXHAUSTED
    states.release([1, 5])
    states.batch([3])
    assert sorted(states.arrays) == [2, 3]


def test_an_update_past_the_state_length_is_refused() -> None:
    states = SequenceStates(StateSpec.from_config(ENTRY))
    states.batch([1])
    with pytest.raises(ServingError) as refused:
        states.update([1], np.array([5]), np.zeros((2, 2, 1, 3, 2, 4), np.float32))
    assert refused.value.code == ErrorCode.INVALID_ARGUMENT


def test_a_malformed_state_entry_names_the_problem() -> None:
    with pytest.raises(ValueError, match="incomplete"):
        StateSpec.from_config({"name": "kv"})
    with pytest.raises(ValueError, match="impossible"):
        StateSpec.from_config({**ENTRY, "time_axis": 2})


def write_rank(folder: Path, subgraphs: list[dict] | None) -> list[Path]:
    folder.mkdir(parents=True)
    files = [folder / "m_0.mindir", folder / "m_1.mindir"]
    for file in files:
        file.write_bytes(b"")
    config = {"rank": 0, "rank_size": 1, "inputs": [{"name": "tokens", "dtype": "int32", "shape": [-1, -1]}]}
    if subgraphs is not None:
        config["subgraphs"] = subgraphs
    (folder / "group_config.json").write_text(json.dumps(config))
    return files


def test_a_rank_folder_or_joined_files_name_its_subgraphs_in_order(tmp_path: Path) -> None:
    entries = [{"file": "m_0.mindir", "inputs": [{"name": "tokens", "dtype": "int32", "shape": [-1, -1]}],
                "outputs": [], "state": ENTRY},
               {"file": "m_1.mindir", "inputs": [{"name": "tokens", "dtype": "int32", "shape": [-1, 1]}],
                "outputs": []}]
    files = write_rank(tmp_path / "device0", entries)
    assert subgraph_files(tmp_path / "device0") == files
    assert subgraph_files(f"{files[0]};{files[1]}") == files
    shard, subgraphs = read_subgraphs(files, None)
    assert [s.signature.stateful for s in subgraphs] == [True, False]
    assert shard.subgraphs[1].inputs[0].shape == [-1, 1] and shard.signature == shard.subgraphs[0]
    assert subgraphs[0].state == StateSpec.from_config(ENTRY) and subgraphs[1].state is None


def test_a_group_config_that_lists_other_files_is_refused(tmp_path: Path) -> None:
    files = write_rank(tmp_path / "device0", [{"file": "m_0.mindir"}])
    with pytest.raises(ValueError, match="1 subgraphs, the agent was given 2"):
        read_subgraphs(files, None)
    files = write_rank(tmp_path / "device1", [{"file": "m_1.mindir"}, {"file": "m_0.mindir"}])
    with pytest.raises(ValueError, match=r"subgraph 0 is m_1\.mindir"):
        read_subgraphs(files, None)
