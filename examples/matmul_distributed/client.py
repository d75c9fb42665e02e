"""Call the MatMul servable once (reference: client.py)."""

import numpy as np

from zmserve.client import Client


def run_matmul(address: str = "127.0.0.1:5500") -> None:
    client = Client(address, "matmul", "predict")
    instance = {"x": np.ones((128, 96), np.float32)}
    result = client.infer(instance, timeout=60)
    print(result)
    client.close()


if __name__ == "__main__":
    np.set_printoptions(threshold=8, edgeitems=2)
    run_matmul()
