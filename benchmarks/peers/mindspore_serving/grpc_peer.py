"""MindSpore Serving 2.0.2 and zmserve side by side over gRPC, and MindSpore Serving's own client to call either.

Both serve the same servable on free loopback ports and are stopped and reaped whatever happens (the pieces are
rest_peer's: the peer run in place from its install, the model exported by its MindSpore). The client is
`mindspore_serving.client.Client` 2.0.2 itself, run by the peer's Python 3.9 in `grpc_client_driver.py`: it
cannot be imported here (Python 3.11, another numpy and protobuf), so the driver is a subprocess that reads what
to send from ms_grpc_cases.py and writes what `infer` returned as a pickle.
Used by `grpc_conformance.py`, `grpc_bench.py` and tests/services/gateway/test_grpc_ms.py.
"""

from __future__ import annotations

import contextlib
import pickle
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from benchmarks.peers.mindspore_serving.rest_peer import (
    DEFAULT_PEER,
    REPO,
    RunningServer,
    mindspore_serving,
    peer_shell,
    wait_ready,
)
from zmserve.local import LocalCluster, free_port
from zmserve.supervision import reap

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "grpc_client_driver.py"
CASES_DIR = REPO / "tests" / "services" / "gateway"
ANCHOR_VENV = Path.home() / ".cache" / "zmserve-peers" / "mindspore-serving" / "venv" / "bin" / "python"
__all__ = ["DEFAULT_PEER", "installed", "mindspore_serving_grpc", "run_driver", "zmserve_grpc"]


def installed(peer: Path) -> bool:
    """Whether the peer's setup.sh has run (its venv, with MindSpore Serving's client, exists)."""
    return (peer / "env.sh").is_file() and ANCHOR_VENV.is_file()


def mindspore_serving_grpc(peer: Path, workdir: Path, name: str, config: str) -> contextlib.AbstractContextManager:
    """MindSpore Serving serving `name`; `url` is its gRPC host:port."""
    return mindspore_serving(peer, workdir, name, config, answer_on="grpc")


@contextlib.contextmanager
def zmserve_grpc(workdir: Path, name: str, config: str, model_files: list[Path] | None = None,
                 gateway_args: tuple[str, ...] = ()) -> Iterator[RunningServer]:
    """zmserve (broker, worker, one agent) serving `name` with a gateway answering gRPC; `url` is its host:port."""
    from tests.cluster import export_matmul, write_servable

    model_files = model_files or export_matmul(workdir, 1)
    servables = write_servable(workdir / "servables", name, config)
    cluster = LocalCluster(workdir, servables, name, model_files)
    try:
        address = f"127.0.0.1:{free_port()}"
        http = cluster.start_gateway("gateway", "--grpc-bind", address, *gateway_args)
        wait_ready(http, f"/model/{name}:predict")
        yield RunningServer(address, {name: process.pid for name, process in cluster.processes.items()})
    finally:
        cluster.stop()


def run_driver(peer: Path, *args: str, timeout: float = 600) -> object:
    """Run grpc_client_driver.py with the peer's Python and MindSpore Serving's client; what it wrote."""
    with tempfile.NamedTemporaryFile(suffix=".pickle") as output:
        driver = peer_shell(peer, f'exec "$PY" {DRIVER} {output.name} {" ".join(args)}', stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
        try:
            printed, _ = driver.communicate(timeout=timeout)
        finally:
            reap(driver, timeout=5)
        if driver.returncode != 0:
            raise RuntimeError(f"the MindSpore Serving client driver failed ({driver.returncode}):\n{printed[-3000:]}")
        with open(output.name, "rb") as stream:
            return pickle.load(stream)
