"""One zmserve cluster (rank-1 MatMul), three ways in, one client process, alternating: p50 of sequential calls
through the gateway's gRPC (MSService/Predict, a client of zmserve/proto's stubs), the gateway's HTTP (MindSpore
Serving's REST scheme, b64 body, keep-alive) and zmserve's own zmq client straight to the broker. What the gRPC
front costs over the other two, on the same machine at the same time: p50, and the gateway process's CPU per call
(user + system, which a busy machine distorts less than time).

    .venv/bin/python -m benchmarks.peers.mindspore_serving.grpc_paths [--calls 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from tests.cluster import export_matmul, write_servable  # noqa: E402
from tests.services.gateway.ms_grpc_client import MsClient  # noqa: E402
from tests.services.gateway.ms_rest_cases import SERVABLE, ZMSERVE_CONFIG  # noqa: E402
from zmserve.local import LocalCluster  # noqa: E402
from zmserve.transport import free_port  # noqa: E402


def measure(call: Callable[[], object], calls: int, gateway: psutil.Process) -> tuple[float, float]:
    """p50 ms of `calls` sequential calls, and the gateway's CPU ms per call."""
    seconds = []
    cpu = gateway.cpu_times()
    for _ in range(calls):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    after = gateway.cpu_times()
    cpu_ms = 1e3 * (after.user + after.system - cpu.user - cpu.system) / calls
    return 1e3 * statistics.median(seconds), cpu_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    x = np.ones((128, 96), np.float32)
    with tempfile.TemporaryDirectory(prefix="grpc_paths_") as tmp:
        work = Path(tmp)
        servables = write_servable(work / "servables", SERVABLE, ZMSERVE_CONFIG)
        cluster = LocalCluster(work, servables, SERVABLE, export_matmul(work, 1))
        try:
            cluster.wait_ready({"x": x})
            address = f"127.0.0.1:{free_port()}"
            host, port = cluster.start_gateway("gateway", "--grpc-bind", address).removeprefix("http://").split(":")
            grpc_client, zmq_client = MsClient(address), cluster.client("predict", SERVABLE)
            connection = http.client.HTTPConnection(host, int(port))
            body = json.dumps({"instances": [{"x": {"b64": base64.b64encode(x.tobytes()).decode(), "type": "fp32",
                                                    "shape": [128, 96]}}]})

            def over_http() -> None:
                connection.request("POST", f"/model/{SERVABLE}:predict", body)
                assert connection.getresponse().read().startswith(b'{"instances":[{"y"')

            paths = {"grpc": lambda: grpc_client.infer(SERVABLE, "predict", {"x": x}),
                     "http_b64": over_http, "zmq_client": lambda: zmq_client.infer({"x": x})}
            for call in paths.values():
                call()
            gateway = psutil.Process(cluster.processes["gateway"].pid)
            for round_ in range(1, args.rounds + 1):
                order = list(paths.items()) if round_ % 2 else list(paths.items())[::-1]
                for name, call in order:
                    p50, cpu_ms = measure(call, args.calls, gateway)
                    print(f"round {round_}  {name:<10}  p50 {p50:6.2f} ms  gateway CPU {cpu_ms:5.2f} ms/call  "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
            grpc_client.close()
            zmq_client.close()
            connection.close()
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
