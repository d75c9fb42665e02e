"""`zmserve worker` refuses to start on a broken servable or rank table, with a message naming the problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import MATMUL_CONFIG, free_port, write_servable

pytestmark = pytest.mark.slow


def start_worker(servable_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zmserve.cli", "worker", "--servable-dir", str(servable_dir), "--servable", "matmul",
         "--distributed-address", f"127.0.0.1:{free_port()}", "--broker", f"tcp://127.0.0.1:{free_port()}",
         *extra],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ("def broken(:\n", "syntax error"),
        (MATMUL_CONFIG.format(rank_size=6, stage_size=4), "not divisible by stage_size"),
        (MATMUL_CONFIG.format(rank_size=2, stage_size=1).replace("add_stage(model", "add_stage(None"),
         "needs the model from declare_servable"),
        (MATMUL_CONFIG.format(rank_size=2, stage_size=1) + MATMUL_CONFIG.split("\n\n\n")[1], "registered twice"),
    ],
)
def test_broken_servable_config_fails_at_start(tmp_path: Path, config: str, fragment: str) -> None:
    result = start_worker(write_servable(tmp_path, "matmul", config))
    assert result.returncode != 0
    assert fragment in result.stderr


def test_rank_table_that_disagrees_with_rank_size_fails_at_start(tmp_path: Path) -> None:
    servable_dir = write_servable(tmp_path, "matmul", MATMUL_CONFIG.format(rank_size=4, stage_size=1))
    table = {"server_count": "1", "status": "completed", "server_list": [
        {"server_id": "127.0.0.1", "device": [{"device_id": str(r), "rank_id": str(r)} for r in range(2)]}]}
    (tmp_path / "table.json").write_text(json.dumps(table))
    result = start_worker(servable_dir, "--rank-table", str(tmp_path / "table.json"))
    assert result.returncode != 0
    assert "lists 2 ranks but the servable's rank_size is 4" in result.stderr


def test_agents_that_never_come_fail_with_the_missing_ranks(tmp_path: Path) -> None:
    servable_dir = write_servable(tmp_path, "matmul", MATMUL_CONFIG.format(rank_size=2, stage_size=1))
    result = start_worker(servable_dir, "--wait-agents", "1")
    assert result.returncode != 0
    assert "missing ranks [0, 1]" in result.stderr
