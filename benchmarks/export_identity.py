"""Export an identity-like model for transport benchmarks: y = -x (Neg) on float32 x with a fully dynamic 2-D shape,
rank_size 1, so the cost measured is moving the bytes, not computing on them.

    .venv/bin/python -m benchmarks.export_identity --output-dir /tmp/neg/model   # -> device0/neg.mindir
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks.benchlib import REPO  # noqa: F401  (puts the repo on sys.path)
from zmserve.export import WORLD_GROUP, export_rank, tensor_spec


def export(output_dir: Path) -> Path:
    os.environ.setdefault("GLOG_v", "3")
    import mindspore as ms
    from mindspore import nn, ops

    class NegNet(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.neg = ops.Neg()

        def construct(self, x):
            return self.neg(x)

    ms.set_context(mode=ms.GRAPH_MODE)
    group_config = {"rank_size": 1, "stage": 0, "stage_size": 1, "group": WORLD_GROUP,
                    "inputs": [tensor_spec("x", (-1, -1))], "outputs": [tensor_spec("y", (-1, -1))]}
    example = ms.Tensor(shape=[None, None], dtype=ms.float32)
    return export_rank(NegNet(), [example], output_dir, 0, "neg", group_config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True)
    print(export(parser.parse_args().output_dir))


if __name__ == "__main__":
    main()
