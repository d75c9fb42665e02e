"""Call the pipelined MLP servable once and compare its answer with the same model computed by numpy.

`predict` takes `x`, float32, shape (16, 64) (the export's --batch and --hidden), and returns `y` of the same
shape. While the servable starts the call is made again until it serves; when nothing answers at the address
within 10 s, it says so in one line.

    python client.py [ADDRESS]        # default 127.0.0.1:5500
"""

import sys

import export_model as mlp  # this example's export script (its folder is on sys.path): the weights, numpy's forward
import numpy as np

from zmserve.client import Client, ClientError, infer_when_ready


def run_mlp(address: str = "127.0.0.1:5500") -> float:
    """The largest difference between the served y and numpy's."""
    x = np.random.default_rng(0).standard_normal((mlp.DEFAULT_BATCH, mlp.DEFAULT_HIDDEN)).astype(np.float32)
    with Client(address, "mlp", "predict") as client:
        y = infer_when_ready(client, {"x": x}, timeout=10,
                             on_wait=lambda error: print(f"waiting: {error.message}", file=sys.stderr))[0]["y"]
    weights = mlp.make_weights(mlp.DEFAULT_LAYERS, mlp.DEFAULT_HIDDEN, mlp.DEFAULT_FFN)
    return float(np.abs(y - mlp.reference_forward(x, weights)).max())


if __name__ == "__main__":
    try:
        difference = run_mlp(*sys.argv[1:2])
    except ClientError as error:
        sys.exit(f"client.py: {error}")
    print(f"y: shape ({mlp.DEFAULT_BATCH}, {mlp.DEFAULT_HIDDEN}), largest difference from numpy {difference:.1e}")
