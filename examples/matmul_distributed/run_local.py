"""The whole reference flow on this machine, start to finish: export the 8-rank MatMul if needed, start the
server (broker + distributed worker) and the 8 agents, call `predict` once, print the result, shut down.

    python examples/matmul_distributed/run_local.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from zmserve.client import Client, infer_when_ready
from zmserve.supervision import reap

HERE = Path(__file__).resolve().parent
READY_TIMEOUT_S = 300


def main() -> int:
    if not all((HERE / f"model/device{i}/matmul.mindir").is_file() for i in range(8)):
        subprocess.run([sys.executable, str(HERE / "export_model.py"), "--rank-size", "8"], check=True)
    server = subprocess.Popen([sys.executable, str(HERE / "serving_server.py")])
    agents = subprocess.Popen([sys.executable, str(HERE / "serving_agent.py")])
    client = Client("127.0.0.1:5500", "matmul", "predict")
    try:
        result = infer_when_ready(client, {"x": np.ones((128, 96), np.float32)}, READY_TIMEOUT_S, timeout=30)
        np.set_printoptions(threshold=8, edgeitems=2)
        print(result)
        y = result[0]["y"]
        print(f"y: shape {y.shape}, dtype {y.dtype}, every element {y.flat[0]}: {bool((y == -48).all())}")
        return 0 if (y == -48).all() else 1
    finally:
        client.close()
        codes = [reap(agents, timeout=20), reap(server, timeout=20)]
        print(f"agents exited {codes[0]}, server exited {codes[1]}")


if __name__ == "__main__":
    sys.exit(main())
