"""Load from inside a network namespace: `clients` threads send the MLP's `predict` one request at a time for
`duration` seconds and check every result against the unsharded numpy forward pass; prints one JSON summary.

    ip netns exec NS python tests/netload.py tcp://127.0.0.1:5500 --duration 8 --timeout 2

Each request is (sent, done, code) in seconds from the start, code OK, an error code, WRONG or HUNG (a future
still open 5 s after its timeout): the test that started this judges them.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from cluster import MLP_EXAMPLE, load_example_module

from zmserve.client import Client, ClientError

mlp = load_example_module(MLP_EXAMPLE / "export_model.py", "mlp_export_for_netload")
WEIGHTS = mlp.make_weights(mlp.DEFAULT_LAYERS, mlp.DEFAULT_HIDDEN, mlp.DEFAULT_FFN)
HANG_GRACE_S = 5.0


def run(address: str, duration: float, clients: int, timeout: float, pause: float) -> list[tuple[float, float, str]]:
    started = time.monotonic()
    requests: list[tuple[float, float, str]] = []
    lock = threading.Lock()

    def one_client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(address, "mlp", "predict") as client:
            while time.monotonic() - started < duration:
                x = rng.standard_normal((mlp.DEFAULT_BATCH, mlp.DEFAULT_HIDDEN)).astype(np.float32)
                sent = time.monotonic()
                future = client.infer_async({"x": x}, timeout=timeout)
                try:
                    y = future.result(timeout=timeout + HANG_GRACE_S)[0]["y"]
                    code = "OK" if np.allclose(y, mlp.reference_forward(x, WEIGHTS), atol=1e-5, rtol=0) else "WRONG"
                except ClientError as error:
                    code = str(error.code)
                except FutureTimeout:
                    code = "HUNG"
                with lock:
                    requests.append((round(sent - started, 3), round(time.monotonic() - started, 3), code))
                time.sleep(pause)

    threads = [threading.Thread(target=one_client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--pause", type=float, default=0.02)
    args = parser.parse_args()
    print(json.dumps(run(args.address, args.duration, args.clients, args.timeout, args.pause)), flush=True)


if __name__ == "__main__":
    main()
