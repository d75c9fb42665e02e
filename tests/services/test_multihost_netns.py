"""Agents on other hosts, for real: three network namespaces joined by veth to a bridge.

  ns "server"  10.231.0.1  broker (on its own 127.0.0.1) + worker (distributed address 10.231.0.1)
  ns "host_a"  10.231.0.2  agents of ranks 0-1 (stage 0)
  ns "host_b"  10.231.0.3  agents of ranks 2-3 (stage 1)
Stage 0's output crosses from host_a to host_b; the client runs inside the server namespace.
Skipped (with the reason) where the machine does not allow `ip netns`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import MATMUL_CONFIG, MLP_EXAMPLE, export_mlp, write_servable
from netns import SUBNET, hosts

from zmserve.supervision import reap

pytestmark = pytest.mark.slow


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    with hosts("server", "host_a", "host_b") as names:
        yield names


CLIENT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from zmserve.client import Client, ClientError
    sys.path.insert(0, sys.argv[2])
    import export_model as mlp
    x = np.random.default_rng(3).standard_normal((mlp.DEFAULT_BATCH, mlp.DEFAULT_HIDDEN)).astype(np.float32)
    deadline = time.monotonic() + 240
    with Client(sys.argv[1], "mlp", "predict") as client:
        while True:
            try:
                y = client.infer({"x": x}, timeout=30)[0]["y"]
                break
            except ClientError as error:
                if error.code not in ("UNAVAILABLE", "NOT_FOUND") or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    weights = mlp.make_weights(mlp.DEFAULT_LAYERS, mlp.DEFAULT_HIDDEN, mlp.DEFAULT_FFN)
    print(json.dumps({"max_abs_diff": float(np.abs(y - mlp.reference_forward(x, weights)).max())}))
""")


def test_agents_on_two_other_hosts_serve_a_two_stage_model(tmp_path: Path, namespaces: dict[str, str]) -> None:
    model_files = export_mlp(tmp_path, 4, 2)
    servable_dir = write_servable(tmp_path / "servables", "mlp", MATMUL_CONFIG.format(rank_size=4, stage_size=2))
    distributed = f"{SUBNET}.1:6200"
    commands = {
        "broker": ("server", ["broker", "--bind", "tcp://127.0.0.1:5500", "--worker-bind", "tcp://127.0.0.1:5501"]),
        "worker": ("server", ["worker", "--servable-dir", str(servable_dir), "--servable", "mlp",
                              "--distributed-address", distributed, "--broker", "tcp://127.0.0.1:5501"]),
        "host_a": ("host_a", ["agent", "--worker", distributed, "--agent-ip", f"{SUBNET}.2", "--rank-start", "0",
                              "--model-files", f"{model_files[0]},{model_files[1]}"]),
        "host_b": ("host_b", ["agent", "--worker", distributed, "--agent-ip", f"{SUBNET}.3", "--rank-start", "2",
                              "--model-files", f"{model_files[2]},{model_files[3]}"]),
    }
    processes: dict[str, subprocess.Popen] = {}
    env = {**os.environ, "GLOG_v": "3"}
    try:
        for name in ("host_b", "host_a", "broker", "worker"):  # agents first: start order is free
            namespace, args = commands[name]
            processes[name] = subprocess.Popen(
                ["ip", "netns", "exec", namespaces[namespace], sys.executable, "-m", "zmserve.cli", *args],
                stdout=subprocess.DEVNULL, stderr=(tmp_path / f"{name}.log").open("w"), env=env)
        result = subprocess.run(
            ["ip", "netns", "exec", namespaces["server"], sys.executable, "-c", CLIENT, "tcp://127.0.0.1:5500",
             str(MLP_EXAMPLE)], capture_output=True, text=True, timeout=300, env=env)
        logs = "\n".join(f"--- {n}\n" + (tmp_path / f"{n}.log").read_text()[-3000:] for n in commands)
        assert result.returncode == 0, result.stderr[-3000:] + logs
        assert json.loads(result.stdout.strip().splitlines()[-1])["max_abs_diff"] <= 1e-5
    finally:
        codes = {name: reap(process, timeout=20) for name, process in processes.items()}
    assert set(codes.values()) == {0}, codes
