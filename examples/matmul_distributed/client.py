"""Call the MatMul servable once (reference: client.py) and print the result.

`predict` takes `x`, float32, shape (128, 96), and returns `y`, float32, shape (128, 16): -(x @ W) with W all 0.5,
so ones give -48 everywhere. While the servable starts (its agents join their group) the call is made again until
it serves; when nothing answers at the address within 10 s, it says so in one line.

    python client.py [ADDRESS [VERSION]]      # default 127.0.0.1:5500, version 0 (the newest one ready)

Asked for a version that is not serving yet (e.g. the new one of a rolling upgrade), it waits until it serves.
"""

import sys

import numpy as np

from zmserve.client import Client, ClientError, infer_when_ready


def run_matmul(address: str = "127.0.0.1:5500", version: int = 0) -> list[dict]:
    instance = {"x": np.ones((128, 96), np.float32)}
    with Client(address, "matmul", "predict", int(version)) as client:
        return infer_when_ready(client, instance, timeout=10,
                                on_wait=lambda error: print(f"waiting: {error.message}", file=sys.stderr))


if __name__ == "__main__":
    np.set_printoptions(threshold=8, edgeitems=2)
    try:
        print(run_matmul(*sys.argv[1:3]))
    except ClientError as error:
        sys.exit(f"client.py: {error}")
