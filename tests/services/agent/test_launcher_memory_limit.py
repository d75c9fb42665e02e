"""`zmserve agent --memory-limit`: a real launcher and real agents in cgroups. Under 100 MiB an agent cannot even
import MindSpore (about 160 MiB of its own), so each is OOM-killed before it has loaded: after three such deaths
the launcher gives up with one line naming the rank, the limit and the shard size, and leaves no cgroup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import REPO, free_port
from zmserve_services.agent.memory_limit import CGROUP_PREFIX, MemoryLimitError, find_hierarchy


def events(stderr: str, name: str) -> list[dict]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


@pytest.mark.slow
def test_a_shard_that_cannot_load_under_the_limit_stops_the_launcher(tmp_path: Path) -> None:
    try:
        hierarchy = find_hierarchy()
    except MemoryLimitError as error:
        pytest.skip(f"no memory cgroup here: {error}")
    model = tmp_path / "device0" / "model.mindir"
    model.parent.mkdir()
    model.write_bytes(bytes(3 << 20))
    launcher = subprocess.Popen(
        [sys.executable, "-m", "zmserve.cli", "agent", "--worker", f"127.0.0.1:{free_port()}", "--rank-start", "0",
         "--model-files", str(model), "--memory-limit", "100M"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "GLOG_v": "3"})
    try:
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
        launcher.wait()
    assert launcher.returncode == 1, stderr[-3000:]
    crashes = events(stderr, "agent_crashed")
    assert [c["why"] for c in crashes] == [
        "killed by the OOM killer at its memory limit of 100 MiB while loading its shard"] * 3
    assert crashes[-1]["action"] == "give up"
    (failed,) = [line for line in stderr.splitlines() if line.startswith("Error: ")]  # one line, no traceback
    assert failed.startswith("Error: rank 0 was killed by the OOM killer 3 times while loading its shard (3 MiB, ")
    assert "does not fit the memory limit of 100 MiB per agent" in failed and "Traceback" not in stderr
    assert not list(hierarchy.parent.glob(f"{CGROUP_PREFIX}{launcher.pid}-*"))
