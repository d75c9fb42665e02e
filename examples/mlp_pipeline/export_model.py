"""Export a residual MLP cut into pipeline stages x tensor-parallel shards.

The model is `layers` blocks `x <- x + relu(x @ W1 + b1) @ W2 + b2` on `[batch, hidden]` float32. Stage k holds
blocks [k*L/S, (k+1)*L/S). Inside a stage, every block is Megatron-sharded over the stage's tp ranks: W1 by
columns (each rank computes its slice of the hidden activation), W2 by rows (each rank a partial sum), then
AllReduce(sum) adds the partials and b2 is added once. Every rank of a stage ends with the same output, which
the stage leader forwards to the next stage.

    python export_model.py --rank-size 4 --stage-size 2 --output-dir model

With --dynamic-batch the input is [batch, hidden] with the batch dynamic, for a servable declared
with_batch_dim=True: its worker stacks concurrent instances ([hidden] each) into one model call.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from zmserve.export import WORLD_GROUP, export_rank, tensor_spec, write_rank_table

DEFAULT_BATCH, DEFAULT_HIDDEN, DEFAULT_FFN, DEFAULT_LAYERS = 16, 64, 256, 4


def make_weights(layers: int, hidden: int, ffn: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The unsharded model: what the numpy reference computes and what the export cuts up."""
    rng = np.random.default_rng(seed)
    scale1, scale2 = 1 / np.sqrt(hidden), 1 / np.sqrt(ffn)
    return [
        {
            "w1": rng.uniform(-scale1, scale1, (hidden, ffn)).astype(np.float32),
            "b1": rng.uniform(-0.1, 0.1, ffn).astype(np.float32),
            "w2": rng.uniform(-scale2, scale2, (ffn, hidden)).astype(np.float32),
            "b2": rng.uniform(-0.1, 0.1, hidden).astype(np.float32),
        }
        for _ in range(layers)
    ]


def reference_forward(x: np.ndarray, weights: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The unsharded computation in float64."""
    h = x.astype(np.float64)
    for block in weights:
        h = h + np.maximum(h @ block["w1"] + block["b1"], 0) @ block["w2"] + block["b2"]
    return h.astype(np.float32)


def build_stage_shard(blocks: list[dict[str, np.ndarray]], tp_rank: int, tp_size: int):
    """The Cell of one rank: its stage's blocks, holding only this tp rank's slices."""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops

    ffn = blocks[0]["w1"].shape[1]
    cols = slice(tp_rank * ffn // tp_size, (tp_rank + 1) * ffn // tp_size)

    class Block(nn.Cell):
        def __init__(self, index: int, block: dict[str, np.ndarray]) -> None:
            super().__init__()
            self.w1 = Parameter(Tensor(block["w1"][:, cols]), name=f"block{index}.w1")
            self.b1 = Parameter(Tensor(block["b1"][cols]), name=f"block{index}.b1")
            self.w2 = Parameter(Tensor(block["w2"][cols, :]), name=f"block{index}.w2")
            self.b2 = Parameter(Tensor(block["b2"]), name=f"block{index}.b2")
            self.matmul = ops.MatMul()
            self.relu = ops.ReLU()
            self.all_reduce = ops.AllReduce(group=WORLD_GROUP) if tp_size > 1 else None

        def construct(self, x):
            partial = self.matmul(self.relu(self.matmul(x, self.w1) + self.b1), self.w2)
            if self.all_reduce is not None:
                partial = self.all_reduce(partial)
            return x + partial + self.b2

    class StageShard(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.CellList([Block(i, b) for i, b in enumerate(blocks)])

        def construct(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    ms.set_context(mode=ms.GRAPH_MODE)
    return StageShard()


def export(output_dir: Path, rank_size: int, stage_size: int, batch: int = DEFAULT_BATCH,
           hidden: int = DEFAULT_HIDDEN, ffn: int = DEFAULT_FFN, layers: int = DEFAULT_LAYERS, seed: int = 0,
           rank_table: Path | None = None, dynamic_batch: bool = False) -> list[Path]:
    import mindspore as ms

    tp_size = rank_size // stage_size
    if rank_size % stage_size or layers % stage_size or ffn % tp_size:
        raise SystemExit(f"need stage_size | rank_size, stage_size | layers, tp | ffn "
                         f"(rank_size {rank_size}, stage_size {stage_size}, layers {layers}, ffn {ffn})")
    weights = make_weights(layers, hidden, ffn, seed)
    per_stage = layers // stage_size
    if dynamic_batch:
        example = ms.Tensor(shape=[None, hidden], dtype=ms.float32)
        spec = tensor_spec("x", (-1, hidden))
    else:
        example = ms.Tensor(np.zeros((batch, hidden), np.float32))
        spec = tensor_spec("x", (batch, hidden))
    paths = []
    for rank in range(rank_size):
        stage, tp_rank = divmod(rank, tp_size)
        blocks = weights[stage * per_stage:(stage + 1) * per_stage]
        group_config = {"rank_size": rank_size, "stage": stage, "stage_size": stage_size, "tp_rank": tp_rank,
                        "group": WORLD_GROUP, "inputs": [spec], "outputs": [spec],
                        "layers": [stage * per_stage + i for i in range(per_stage)], "seed": seed}
        paths.append(export_rank(build_stage_shard(blocks, tp_rank, tp_size), [example], output_dir, rank,
                                 "mlp", group_config))
    if rank_table is not None:
        write_rank_table(rank_table, rank_size)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank-size", type=int, default=4)
    parser.add_argument("--stage-size", type=int, default=2)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN)
    parser.add_argument("--ffn", type=int, default=DEFAULT_FFN)
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "model")
    parser.add_argument("--rank-table", type=Path, default=None)
    parser.add_argument("--dynamic-batch", action="store_true", help="input [batch, hidden], the batch dynamic")
    args = parser.parse_args()
    for path in export(args.output_dir, args.rank_size, args.stage_size, args.batch, args.hidden, args.ffn,
                       args.layers, args.seed, args.rank_table, args.dynamic_batch):
        print(f"exported {path}")


if __name__ == "__main__":
    main()
