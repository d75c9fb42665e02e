"""Agents on other hosts, for real: three network namespaces joined by veth to a bridge.

  ns "server"  10.231.0.1  broker (on its own 127.0.0.1) + worker (distributed address 10.231.0.1)
  ns "host_a"  10.231.0.2  agents of ranks 0-1 (stage 0)
  ns "host_b"  10.231.0.3  agents of ranks 2-3 (stage 1)
Stage 0's output crosses from host_a to host_b; the client runs inside the server namespace.
Skipped (with the reason) where the machine does not allow `ip netns`. The namespaces come from tests/netns.py.

With `curve`, every process runs with CURVE, --require-curve and MindSpore's TLS inside the stages
(--collective-tls), each host with its own key pair (docs/SECURITY.md's layout, `LocalCluster`'s `ClusterKeys`): no
process starts without keys, and none of the
worker's ports on 10.231.0.1 answers a host that is not in its folder of agent keys.
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

from tests.cluster import MATMUL_CONFIG, MLP_EXAMPLE, Exports, write_servable
from tests.netns import SUBNET, three_hosts
from zmserve.collective_tls import generate as generate_collective_tls
from zmserve.local import ClusterKeys
from zmserve.supervision import reap

pytestmark = pytest.mark.slow


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    with three_hosts() as hosts:
        yield hosts.names


CLIENT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from zmserve.client import Client, ClientError
    import importlib.util
    spec = importlib.util.spec_from_file_location("export_model", sys.argv[2] + "/export_model.py")
    mlp = importlib.util.module_from_spec(spec); spec.loader.exec_module(mlp)
    x = np.random.default_rng(3).standard_normal((mlp.DEFAULT_BATCH, mlp.DEFAULT_HIDDEN)).astype(np.float32)
    deadline = time.monotonic() + 240
    keys = json.loads(sys.argv[3])
    with Client(sys.argv[1], "mlp", "predict", **keys) as client:
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


def curve_arguments(keys: ClusterKeys | None) -> dict[str, list[str]]:
    """Each process's key options; with CURVE, the stages' MindSpore traffic also runs TLS (--require-curve asks
    for it: the groups talk between hosts)."""
    if keys is None:
        return {"broker": [], "worker": [], "host_a": [], "host_b": []}
    tls = ["--collective-tls", str(generate_collective_tls(keys.root / "collective"))]
    return {
        "broker": ["--secret-key", keys.secret("broker"), "--client-keys", keys.allowed("clients"),
                   "--worker-keys", keys.allowed("workers"), "--require-curve"],
        "worker": ["--secret-key", keys.secret("worker"), "--broker-key", keys.public("broker"),
                   "--agent-keys", keys.allowed("agents"), "--require-curve", *tls],
        "host_a": ["--secret-key", keys.secret("host-a"), "--worker-key", keys.public("worker"), "--require-curve",
                   *tls],
        "host_b": ["--secret-key", keys.secret("host-b"), "--worker-key", keys.public("worker"), "--require-curve",
                   *tls],
    }


@pytest.mark.parametrize("curve", [False, True], ids=["plaintext", "curve"])
def test_agents_on_two_other_hosts_serve_a_two_stage_model(tmp_path: Path, namespaces: dict[str, str],
                                                           curve: bool, exports: Exports) -> None:
    model_files = exports.mlp(4, 2)
    servable_dir = write_servable(tmp_path / "servables", "mlp", MATMUL_CONFIG.format(rank_size=4, stage_size=2))
    distributed = f"{SUBNET}.1:6200"
    keys = ClusterKeys.generate(tmp_path / "keys") if curve else None
    secured = curve_arguments(keys)
    commands = {
        "broker": ("server", ["broker", "--bind", "tcp://127.0.0.1:5500", "--worker-bind", "tcp://127.0.0.1:5501",
                              *secured["broker"]]),
        "worker": ("server", ["worker", "--servable-dir", str(servable_dir), "--servable", "mlp",
                              "--distributed-address", distributed, "--broker", "tcp://127.0.0.1:5501",
                              *secured["worker"]]),
        "host_a": ("host_a", ["agent", "--worker", distributed, "--agent-ip", f"{SUBNET}.2", "--rank-start", "0",
                              "--model-files", f"{model_files[0]},{model_files[1]}", *secured["host_a"]]),
        "host_b": ("host_b", ["agent", "--worker", distributed, "--agent-ip", f"{SUBNET}.3", "--rank-start", "2",
                              "--model-files", f"{model_files[2]},{model_files[3]}", *secured["host_b"]]),
    }
    client_keys = {} if keys is None else {"server_public_key": keys.public("broker"),
                                           "secret_key": keys.secret("client")}
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
             str(MLP_EXAMPLE), json.dumps(client_keys)], capture_output=True, text=True, timeout=300, env=env)
        logs = "\n".join(f"--- {n}\n" + (tmp_path / f"{n}.log").read_text()[-3000:] for n in commands)
        assert result.returncode == 0, result.stderr[-3000:] + logs
        assert json.loads(result.stdout.strip().splitlines()[-1])["max_abs_diff"] <= 1e-5
        warnings = [line for n in commands for line in (tmp_path / f"{n}.log").read_text().splitlines()
                    if "plaintext_on_network" in line]
        # the worker binds 10.231.0.1, the stage leader 10.231.0.2: warned about in plaintext only
        assert bool(warnings) is not curve, warnings
    finally:
        codes = {name: reap(process, timeout=20) for name, process in processes.items()}
    assert set(codes.values()) == {0}, codes
