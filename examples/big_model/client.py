"""Call the big model's servable once and compare its answer with the float64 numpy forward (reference.py).

`predict` takes `x`, float32, shape (seq, hidden) per instance (the export's --seq, 16 by default; hidden 1024
for the small preset, 2048 for the full one) and returns `y` of the same shape. While the servable starts the
call is made again until it serves; when nothing answers at the address within 30 s, it says so in one line.

    python client.py --preset small [--address 127.0.0.1:5500] [--seed 0]
"""

import argparse
import sys

import numpy as np
from reference import forward  # this example's folder is on sys.path when the script runs
from weights import PRESETS

from zmserve.client import Client, ClientError, infer_when_ready

SEQ = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--address", default="127.0.0.1:5500")
    parser.add_argument("--seed", type=int, default=0, help="the export's seed")
    args = parser.parse_args()
    dims = PRESETS[args.preset]
    x = np.random.default_rng(1).standard_normal((SEQ, dims.hidden)).astype(np.float32)
    try:
        with Client(args.address, "big", "predict") as client:
            y = infer_when_ready(client, {"x": x}, ready_within=300, timeout=30,
                                 on_wait=lambda error: print(f"waiting: {error.message}", file=sys.stderr))[0]["y"]
    except ClientError as error:
        sys.exit(f"client.py: {error}")
    difference = float(np.abs(y - forward(x[None], dims, seed=args.seed)[0]).max())
    print(f"y: shape {y.shape}, largest difference from numpy {difference:.1e}")


if __name__ == "__main__":
    main()
