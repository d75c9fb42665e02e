"""examples/big_model scaled down (the 'small' preset, 202 MB): the same model fits 8 memory-limited agents
(TP4xPP2) but not one agent under the same limit, and an agent pushed past its limit while serving dies, is
reported by the servable as a lost agent naming the limit, and the servable serves again.

The limit, 400 MiB, sits between the two: a sharded agent peaks at ~230 MiB charged to its cgroup (MindSpore's
own ~180 MiB plus twice its 25 MB shard while loading), the unsharded one would need ~600 MiB. The full-size
proof (4 GiB over 8 agents under 1.5 GiB each) is examples/big_model/prove.py; its result is in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import REPO, Cluster, load_example_module, log_events, wait_for
from zmserve.client import ClientError
from zmserve.protocol import ErrorCode
from zmserve.streamed_export import shard_bytes
from zmserve_services.agent.memory_limit import CGROUP_PREFIX, MemoryLimitError, find_hierarchy, format_size

EXAMPLE = REPO / "examples" / "big_model"
sys.path.append(str(EXAMPLE))  # appended: examples/minilm has modules of the same names (reference, model)

from weights import PRESETS  # noqa: E402

forward = load_example_module(EXAMPLE / "reference.py", "big_model_reference").forward

DIMS = PRESETS["small"]
LIMIT = "400M"
LIMIT_TEXT = "memory limit of 400 MiB"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def cgroups_available() -> None:
    try:
        find_hierarchy()
    except MemoryLimitError as error:
        pytest.skip(f"no memory cgroup here: {error}")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The small preset exported as TP4xPP2 and unsharded (TP1xPP1), streamed from seed 0, any sequence length
    (the out-of-memory request below is a long one)."""
    root = tmp_path_factory.mktemp("big_model")
    layouts = {"tp4pp2": (8, 2), "tp1pp1": (1, 1)}
    for name, (rank_size, stage_size) in layouts.items():
        layout = ["--rank-size", str(rank_size), "--stage-size", str(stage_size), "--output-dir", str(root / name)]
        subprocess.run([sys.executable, str(EXAMPLE / "export_model.py"), "--preset", "small", "--seq", "0", *layout],
                       check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    return {name: root / name for name in layouts}


def model_files(export: Path) -> list[Path]:
    return sorted(export.glob("model/device*/big.mindir"), key=lambda p: int(p.parent.name[len("device"):]))


@pytest.fixture
def sharded(tmp_path: Path, exports: dict[str, Path]) -> Iterator[Cluster]:
    export = exports["tp4pp2"]
    cluster = Cluster(tmp_path, export, "big", model_files(export), extra_agent_args=["--memory-limit", LIMIT])
    yield cluster
    cluster.stop()


def test_the_sharded_model_serves_correctly_under_the_limit_and_survives_an_agent_oom(sharded: Cluster) -> None:
    rng = np.random.default_rng(17)
    xs = rng.standard_normal((3, 8, DIMS.hidden)).astype(np.float32)
    sharded.wait_ready({"x": xs[0]})
    expected = forward(xs, DIMS, seed=0)
    with sharded.client() as client:
        futures = [client.infer_async({"x": x}) for x in xs]
        for future, y in zip(futures, expected, strict=True):
            np.testing.assert_allclose(future.result(timeout=60)[0]["y"], y, atol=1e-4, rtol=0)

        # 4096 tokens: stage 0's attention scores alone are 134 MB per tensor on each rank, past the limit.
        with pytest.raises(ClientError) as lost:
            client.infer({"x": rng.standard_normal((4096, DIMS.hidden)).astype(np.float32)}, timeout=120)
    assert lost.value.code == ErrorCode.UNAVAILABLE
    assert f"killed by the OOM killer at its {LIMIT_TEXT} while serving" in lost.value.message

    sharded.wait_ready({"x": xs[0]})  # the agents were restarted and the groups formed again
    with sharded.client() as client:
        np.testing.assert_allclose(client.infer({"x": xs[1]}, timeout=60)[0]["y"], expected[1], atol=1e-4, rtol=0)
    crashes = log_events(sharded.logs["agents"], "agent_crashed")
    assert crashes and all(c["why"].endswith(f"{LIMIT_TEXT} while serving") for c in crashes)


def test_the_unsharded_model_does_not_load_in_one_agent_under_the_same_limit(tmp_path: Path,
                                                                            exports: dict[str, Path]) -> None:
    export = exports["tp1pp1"]
    cluster = Cluster(tmp_path, export, "big", model_files(export), extra_agent_args=["--memory-limit", LIMIT])
    launcher = cluster.processes["agents"]
    try:
        wait_for(lambda: launcher.poll() is not None, timeout=150, what="the launcher to give up",
                 details=cluster.log_tails)
        assert launcher.returncode == 1
        (failed,) = [line for line in cluster.logs["agents"].read_text().splitlines() if line.startswith("Error: ")]
        shard = model_files(export)[0]
        assert failed.startswith("Error: rank 0 was killed by the OOM killer 3 times while loading its shard "
                                 f"({format_size(shard_bytes(shard))}, {shard})")  # 193.09 MiB
        assert f"does not fit the {LIMIT_TEXT} per agent" in failed
        with cluster.client() as client, pytest.raises(ClientError) as refused:
            client.infer({"x": np.zeros((8, DIMS.hidden), np.float32)}, timeout=10)
        assert refused.value.code == ErrorCode.UNAVAILABLE
        assert f"killed by the OOM killer at its {LIMIT_TEXT} while loading its shard" in refused.value.message
    finally:
        codes = cluster.stop()
    assert codes == {"agents": 1, "worker": 0, "broker": 0}
    assert not list(find_hierarchy().parent.glob(f"{CGROUP_PREFIX}{launcher.pid}-*"))
