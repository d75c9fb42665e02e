"""Export the reference MatMul (x @ W, W = 0.5, then Neg) sharded by hand over `rank_size` ranks.

Row-parallel (Megatron style): rank r holds only rows [r*k, (r+1)*k) of the 96x16 weight, multiplies the matching
columns of x by them, and an AllReduce(sum) inside the graph adds the partial products of all ranks. Every rank
then holds the same full result, as the reference requires of the last stage.

Lean (issue 23): each graph runs only the kernels its layout needs: rank_size 1 is MatMul + Neg (no slice of
the whole axis, a ~350 µs kernel; no AllReduce); rank_size n > 1 is slice + MatMul + AllReduce + Neg. The 2-D
input uses `ops.MatMul`; the batched one ([B, 128, 96], --batch-dim) one broadcasting `ops.matmul` (MatMulExt).

    python export_model.py --rank-size 8          # -> model/device{0..7}/matmul.mindir, rank_table_8pcs.json
    python export_model.py --rank-size 2 --weight-value 0.25 --output-dir matmul/2   # version 2: other weights
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from zmserve.export import WORLD_GROUP, column_slice, export_rank, tensor_spec, write_rank_table

INPUT_SHAPE = (128, 96)
WEIGHT_SHAPE = (96, 16)
WEIGHT_VALUE = 0.5


def build_rank_cell(rank: int, rank_size: int, weight_value: float = WEIGHT_VALUE, batch_dim: bool = False):
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops

    columns = column_slice(rank, rank_size, WEIGHT_SHAPE[0])
    lo, hi = columns or (0, WEIGHT_SHAPE[0])
    weight = np.full(WEIGHT_SHAPE, weight_value, dtype=np.float32)[lo:hi]

    class MatMulShard(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.weight = Parameter(Tensor(weight), name="weight")
            self.sliced = columns is not None
            # [B, 128, k] @ [k, 16] with the weight broadcast needs the functional (MatMulExt); 2-D takes MatMul
            self.matmul = ops.matmul if batch_dim else ops.MatMul()
            self.all_reduce = ops.AllReduce(group=WORLD_GROUP) if rank_size > 1 else None
            self.neg = ops.Neg()

        def construct(self, x):
            if self.sliced:
                x = x[..., lo:hi]
            partial = self.matmul(x, self.weight)
            if self.all_reduce is not None:
                partial = self.all_reduce(partial)
            return self.neg(partial)

    ms.set_context(mode=ms.GRAPH_MODE)
    return MatMulShard()


def export(output_dir: Path, rank_size: int, rank_table: Path | None, batch_dim: bool = False,
           weight_value: float = WEIGHT_VALUE) -> None:
    """Export every rank; with `batch_dim` the input is [batch, 128, 96] with a dynamic batch (for servables
    declared with_batch_dim=True, whose worker stacks concurrent requests into one call). `weight_value` is every
    element of W (another value makes another version of the model: y = -(x @ W))."""
    import mindspore as ms

    if WEIGHT_SHAPE[0] % rank_size != 0:
        raise SystemExit(f"rank_size {rank_size} must divide the weight's {WEIGHT_SHAPE[0]} rows")
    batch = (-1,) if batch_dim else ()
    if batch_dim:
        example = ms.Tensor(shape=[None, *INPUT_SHAPE], dtype=ms.float32)
    else:
        example = ms.Tensor(np.ones(INPUT_SHAPE, dtype=np.float32))
    group_config = {
        "rank_size": rank_size, "stage": 0, "stage_size": 1, "group": WORLD_GROUP,
        "inputs": [tensor_spec("x", (*batch, *INPUT_SHAPE))],
        "outputs": [tensor_spec("y", (*batch, INPUT_SHAPE[0], WEIGHT_SHAPE[1]))],
        "weight_rows": WEIGHT_SHAPE[0] // rank_size,
    }
    for rank in range(rank_size):
        cell = build_rank_cell(rank, rank_size, weight_value, batch_dim)
        path = export_rank(cell, [example], output_dir, rank, "matmul", group_config)
        print(f"exported rank {rank}: {path}")
    if rank_table is not None:
        write_rank_table(rank_table, rank_size)
        print(f"wrote {rank_table}")


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank-size", type=int, default=8)
    parser.add_argument("--output-dir", type=Path, default=here / "model")
    parser.add_argument("--rank-table", type=Path, default=None,
                        help="default: rank_table_<N>pcs.json next to this script")
    parser.add_argument("--batch-dim", action="store_true", help="input [batch, 128, 96], batch dynamic")
    parser.add_argument("--weight-value", type=float, default=WEIGHT_VALUE,
                        help=f"every element of W (default {WEIGHT_VALUE}); another value is another model version")
    args = parser.parse_args()
    rank_table = args.rank_table or here / f"rank_table_{args.rank_size}pcs.json"
    export(args.output_dir, args.rank_size, rank_table, args.batch_dim, args.weight_value)


if __name__ == "__main__":
    main()
