"""MindSpore Serving 2.0.2's REST server as a peer for zmserve's gateway: the same MatMul servable on both, each
server on free loopback ports, both stopped and reaped whatever happens.

The peer is run in place from its install (`<peer>/setup.sh` put it in ~/.cache/zmserve-peers): its own
`serve.py`, `env.sh` (MindSpore Lite runtime paths) and Python 3.9 venv, with a servable folder made here
(the MatMul exported by the peer's MindSpore 2.0, and the methods of `tests/services/gateway/ms_rest_cases.py`).
Used by `rest_conformance.py` and `benchmarks/gateway_http.py`.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[3]

from tests.cluster import export_matmul, write_servable  # noqa: E402
from zmserve.local import LocalCluster, free_port  # noqa: E402
from zmserve.supervision import reap  # noqa: E402

DEFAULT_PEER = "../shared/peers/mindspore-serving"
PEER_PYENV = "3.11.7:3.9.18:3.7.16"
START_TIMEOUT_S = 120.0
EXPORT = """
import sys
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.matmul = ops.MatMul()
        self.neg = ops.Neg()
        self.w = Parameter(Tensor(np.full((96, 16), 0.5, np.float32)), name="w")

    def construct(self, x):
        return self.neg(self.matmul(x, self.w))


ms.export(Net(), Tensor(np.ones((128, 96), np.float32)), file_name=sys.argv[1], file_format="MINDIR")
"""


@dataclass(frozen=True)
class RunningServer:
    url: str
    pids: dict[str, int]
    """Its top processes by name; CPU counts their children too (MindSpore Serving's worker, zmserve's agents)."""

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU so far of each top process with its children."""
        return {name: _tree_cpu_seconds(pid) for name, pid in self.pids.items()}


def _tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    try:
        process = psutil.Process(pid)
        for member in [process, *process.children(recursive=True)]:
            times = member.cpu_times()
            total += times.user + times.system
    except psutil.NoSuchProcess:
        pass
    return total


def peer_dir(relative: str) -> Path:
    """The peer's folder, given relative to the repository root (worktrees live beside ../shared)."""
    path = (REPO / relative).resolve()
    if not (path / "serve.py").is_file():
        raise SystemExit(f"no MindSpore Serving peer at {path} (expected serve.py there)")
    return path


def peer_shell(peer: Path, command: str, **kwargs) -> subprocess.Popen:
    """`command` in bash after the peer's env.sh (its $PY, LD_LIBRARY_PATH for the Lite runtime)."""
    env = {**os.environ, "PYENV_VERSION": PEER_PYENV, "GLOG_v": "3"}
    return subprocess.Popen(["bash", "-c", f"source {peer}/env.sh && {command}"], env=env, **kwargs)


def write_peer_servable(peer: Path, root: Path, name: str, config: str) -> Path:
    """`root/name/{servable_config.py, 1/matmul.mindir}`, the model exported with the peer's MindSpore."""
    version_dir = root / name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    script = root / "export_matmul.py"
    script.write_text(EXPORT)
    exported = peer_shell(peer, f'exec "$PY" {script} {version_dir / "matmul"}', stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    output, _ = exported.communicate(timeout=300)
    if exported.returncode != 0 or not (version_dir / "matmul.mindir").is_file():
        raise RuntimeError(f"peer export failed ({exported.returncode}):\n{output[-3000:]}")
    (root / name / "servable_config.py").write_text(config)
    return root


@contextlib.contextmanager
def mindspore_serving(peer: Path, workdir: Path, name: str, config: str,
                      answer_on: str = "rest") -> Iterator[RunningServer]:
    """MindSpore Serving serving `name` on free ports; `url` is its REST base URL, or its gRPC host:port when
    `answer_on` is "grpc"."""
    servables = write_peer_servable(peer, workdir / "peer_servables", name, config)
    grpc_port, rest_port = free_port(), free_port()
    log_path = workdir / "peer_server.log"
    with log_path.open("w") as log:
        server = peer_shell(peer, f'cd {workdir} && exec "$PY" {peer}/serve.py {servables} {grpc_port} {rest_port} '
                                  f"{name}", stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "SERVING_READY" not in log_path.read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"MindSpore Serving did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        url = f"127.0.0.1:{grpc_port}" if answer_on == "grpc" else f"http://127.0.0.1:{rest_port}"
        yield RunningServer(url, {"mindspore_serving": server.pid})
    finally:
        reap(server, timeout=30)


@contextlib.contextmanager
def zmserve_gateway(workdir: Path, name: str, config: str, model_files: list[Path] | None = None,
                    worker_args: tuple[str, ...] = ()) -> Iterator[RunningServer]:
    """zmserve (broker, worker, one agent) serving `name` with a gateway in front. The model is the rank-1 MatMul
    unless `model_files` are given."""
    model_files = model_files or export_matmul(workdir, 1)
    servables = write_servable(workdir / "servables", name, config)
    cluster = LocalCluster(workdir, servables, name, model_files, list(worker_args), standby=True)
    try:
        url = cluster.start_gateway("gateway")
        wait_ready(url, f"/model/{name}:predict")
        yield RunningServer(url, {name: process.pid for name, process in cluster.processes.items()})
    finally:
        cluster.stop()


def wait_ready(url: str, path: str, timeout: float = START_TIMEOUT_S) -> None:
    """Until the servable answers a MatMul (not 'not ready yet')."""
    import json

    body = json.dumps({"instances": [{"x": [[1.0] * 96] * 128}]}).encode()
    deadline = time.monotonic() + timeout
    while True:
        status, _ = post(url, path, body)
        if status == 200:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}{path} still answers {status} after {timeout} s")
        time.sleep(0.2)


def post(url: str, path: str, body: bytes, method: str = "POST") -> tuple[int, bytes]:
    """One request on a fresh connection; MindSpore Serving sometimes drops a connection, so one retry."""
    host, port = url.removeprefix("http://").split(":")
    for attempt in range(2):
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        except (http.client.HTTPException, ConnectionError):
            if attempt:
                raise
        finally:
            connection.close()
    raise AssertionError("unreachable")
