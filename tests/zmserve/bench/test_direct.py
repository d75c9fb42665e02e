"""`zmserve bench run --direct` (zmserve/bench/direct.py): which model files it accepts (no MindSpore: the shards
are placeholder files beside real group configs), and real runs of exported shards (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.cluster import Exports
from zmserve.bench.direct import timed_calls, whole_rank_set
from zmserve.bench.errors import BenchError
from zmserve.bench.records import RECORD_FIELDS, Record
from zmserve.cli import main

BENCH = [sys.executable, "-m", "zmserve.cli", "bench"]


def shard_files(root: Path, ranks: list[int], rank_size: int, stage_size: int = 1) -> list[str]:
    """Placeholder MindIRs with the group_config.json the export writes beside each."""
    files = []
    for rank in ranks:
        folder = root / f"device{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "m.mindir").write_bytes(b"not read: the rank set is checked first")
        (folder / "group_config.json").write_text(json.dumps({"rank": rank, "rank_size": rank_size,
                                                              "stage": 0, "stage_size": stage_size}))
        files.append(str(folder / "m.mindir"))
    return files


def test_the_whole_rank_set_comes_back_in_rank_order(tmp_path: Path) -> None:
    files = shard_files(tmp_path, [0, 1, 2, 3], 4)
    assert whole_rank_set([files[2], files[0], files[3], files[1]]) == files


@pytest.mark.parametrize(
    ("given", "rank_size", "message"),
    [
        ([0, 1], 8, "--direct needs every rank of the model: got ranks 0-1 of rank_size 8, missing ranks 2-7"),
        ([1], 2, "--direct needs every rank of the model: got rank 1 of rank_size 2, missing rank 0"),
        ([0, 2, 3], 4, "--direct needs every rank of the model: got ranks 0, 2, 3 of rank_size 4, missing rank 1"),
    ],
)
def test_a_partial_rank_set_is_refused_in_one_line(tmp_path: Path, given: list[int], rank_size: int,
                                                   message: str) -> None:
    files = shard_files(tmp_path, given, rank_size)
    result = CliRunner().invoke(main, ["bench", "run", "--direct", "--model-files", ",".join(files),
                                       "--shape", "128x96"])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {message}\n"


def test_mixed_models_duplicates_pipelines_and_unknown_ranks_are_refused(tmp_path: Path) -> None:
    two = shard_files(tmp_path / "two", [0, 1], 2)
    eight = shard_files(tmp_path / "eight", [0], 8)
    with pytest.raises(BenchError, match="come from different models"):
        whole_rank_set([two[0], eight[0]])
    with pytest.raises(BenchError, match=r"rank 0 given twice"):
        whole_rank_set([two[0], two[0], two[1]])
    pipeline = shard_files(tmp_path / "pp", [0, 1], 2, stage_size=2)
    with pytest.raises(BenchError, match="from a 2-stage pipeline"):
        whole_rank_set(pipeline)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.mindir").write_bytes(b"")
    (tmp_path / "plain" / "b.mindir").write_bytes(b"")
    assert whole_rank_set([str(tmp_path / "plain" / "a.mindir")]) == [str(tmp_path / "plain" / "a.mindir")]
    with pytest.raises(BenchError, match=r"no group_config\.json beside .*a\.mindir, so its rank is unknown"):
        whole_rank_set([str(tmp_path / "plain" / "a.mindir"), str(tmp_path / "plain" / "b.mindir")])


@pytest.mark.slow
@pytest.mark.parametrize("rank_size", [1, 2])
def test_direct_runs_the_shards(exports: Exports, rank_size: int) -> None:
    model_files = exports.matmul(rank_size)
    result = subprocess.run(
        [*BENCH, "run", "--direct", "--model-files", ",".join(map(str, model_files)), "--shape", "128x96",
         "--fill", "random", "--seed", "1", "--requests", "30", "--timeout", "30", "--startup-timeout", "120"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == list(range(30))
    assert all(r["status"] == "OK" for r in records)
    assert all(set(r) == set(RECORD_FIELDS) for r in records)
    assert {(r["bytes_out"], r["bytes_in"]) for r in records} == {(128 * 96 * 4, 128 * 16 * 4)}
    assert "requests    30 (OK 30)" in result.stderr


def test_a_failed_call_is_recorded_with_its_message_and_ends_the_calls() -> None:
    """timed_calls over any callable: the third call fails, its record says why, and no call follows (in a
    collective group the other ranks could not go on alone)."""
    calls: list[int] = []

    def call(inputs: list[np.ndarray]) -> list[np.ndarray]:
        calls.append(len(calls))
        if len(calls) == 4:  # one warm-up call, then the third timed call
            raise RuntimeError("For 'MatMul', shapes do not match\n----\nC++ Call Stack: ...")
        return [inputs[0] * 2]

    records: list[Record] = []
    finished = timed_calls(call, [[[np.ones((2, 2), np.float32)]]], calls=5, warmup=1, emit=records.append)
    assert finished is False and len(calls) == 4
    assert [r.status for r in records] == ["OK", "OK", "INTERNAL"]
    assert records[2].message == "RuntimeError: For 'MatMul', shapes do not match"
    assert (records[0].bytes_out, records[0].bytes_in) == (16, 16)


def test_a_failed_warm_up_is_one_line() -> None:
    def call(inputs: list[np.ndarray]) -> list[np.ndarray]:
        raise ValueError("wrong shape\nmore lines")

    with pytest.raises(BenchError) as caught:
        timed_calls(call, [[[np.ones(2)]]], calls=1, warmup=1, emit=lambda record: None)
    assert caught.value.message == "the warm-up call failed: ValueError: wrong shape"


@pytest.mark.slow
def test_inputs_that_do_not_fit_the_shard_fail_in_one_line(exports: Exports) -> None:
    """The wrong input shape for the exported graph: MindSpore's error, first line only, exit 1, no traceback."""
    (model_file,) = exports.matmul(1)
    result = subprocess.run(
        [*BENCH, "run", "--direct", "--model-files", str(model_file), "--shape", "4x4", "--requests", "3"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "the warm-up call failed: RuntimeError:" in errors[0] and "96" in errors[0]
    assert "Traceback" not in result.stderr
