"""`zmserve.server.start_grpc_server` and `start_restful_server`: MindSpore Serving's serving_server.py, its
imports changed (and, here only, free ports instead of 5500/1500/6200), serves its own gRPC client and HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.cluster import export_matmul, wait_for, write_servable
from tests.services.gateway.ms_grpc_client import MsClient
from zmserve.supervision import reap
from zmserve.transport import free_port, free_port_range

pytestmark = pytest.mark.slow

CONFIG = '''from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size=1, stage_size=1, with_batch_dim=False)


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y
'''
SERVER = '''"""Start Distributed Servable matmul"""

import os
import sys
from zmserve import server
from zmserve.server import distributed


def start():
    servable_dir = sys.argv[1]
    distributed.start_servable(servable_dir, "matmul",
                               version_number=1,
                               distributed_address="{distributed}",
                               broker_address="tcp://127.0.0.1:{broker}")

    server.start_grpc_server("127.0.0.1:{grpc}")
    server.start_restful_server("127.0.0.1:{rest}")


if __name__ == "__main__":
    start()
'''


class Server:
    def __init__(self, grpc: str, rest: str, process: subprocess.Popen, log: Path) -> None:
        self.grpc = grpc
        self.rest = rest
        self.process = process
        self.log = log


@pytest.fixture(scope="module")
def serving_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("frontends")
    model_files = export_matmul(workdir, 1)
    servables = write_servable(workdir / "servables", "matmul", CONFIG)
    distributed = f"127.0.0.1:{free_port()}"
    grpc, rest = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    script = workdir / "serving_server.py"
    script.write_text(SERVER.format(distributed=distributed, broker=free_port(), grpc=grpc.split(":")[1],
                                    rest=rest.split(":")[1]))
    log = workdir / "server.log"
    server = subprocess.Popen([sys.executable, str(script), str(servables)], stdout=subprocess.DEVNULL,
                              stderr=log.open("w"))
    agents = subprocess.Popen([sys.executable, "-m", "zmserve.cli", "agent", "--worker", distributed,
                               "--model-files", str(model_files[0]), "--agent-start-port", str(free_port_range(1))],
                              stdout=subprocess.DEVNULL, stderr=(workdir / "agents.log").open("w"))
    try:
        yield Server(grpc, rest, server, log)
    finally:
        reap(agents, timeout=30)
        code = reap(server, timeout=30)
    assert code == 0, log.read_text()[-3000:]


def ready(client: MsClient) -> bool:
    """The servable answers (not yet: nothing listens, or the worker waits for its agent)."""
    try:
        answer = client.infer("matmul", "predict", {"x": np.ones((128, 96), np.float32)}, timeout=5)
    except grpc.RpcError:
        return False
    return isinstance(answer, list)


def test_the_grpc_server_answers_mindspore_servings_client(serving_server: Server) -> None:
    client = MsClient(serving_server.grpc)
    try:
        wait_for(lambda: ready(client), timeout=120, what="the servable answers over gRPC", interval=0.2,
                 details=lambda: serving_server.log.read_text()[-2000:])
        answer = client.infer("matmul", "predict", [{"x": np.ones((128, 96), np.float32)}] * 2)
        assert [float(np.unique(a["y"])[0]) for a in answer] == [-48.0, -48.0]
    finally:
        client.close()


def test_the_restful_server_answers_http(serving_server: Server) -> None:
    client = MsClient(serving_server.grpc)
    try:
        wait_for(lambda: ready(client), timeout=120, what="the servable answers over gRPC", interval=0.2)
    finally:
        client.close()
    body = json.dumps({"instances": [{"x": [[1.0] * 96] * 128}]}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"http://{serving_server.rest}/model/matmul:predict",
                                                       data=body), timeout=30) as response:
        y = np.array(json.loads(response.read())["instances"][0]["y"])
    assert y.shape == (128, 16) and np.all(y == -48.0)
