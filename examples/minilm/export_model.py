"""Export all-MiniLM-L6-v2 sharded over `rank_size` ranks in `stage_size` pipeline stages, one MindIR per rank.

Rank r belongs to stage r // tp and is tensor-parallel rank r % tp of it (tp = rank_size / stage_size). Every
MindIR has dynamic batch and sequence dimensions (shape [None, None] at export, -1 in group_config.json): one
graph serves every bucket length, and MindSpore compiles a kernel plan per new shape on its first call.

    python export_model.py --rank-size 4 --stage-size 2     # -> model/device{0..3}/minilm.mindir, rank table
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from assets import HIDDEN, LAYERS, load_weights
from model import WORLD_GROUP, build_stage_cell, check_layout, stage_layers

from zmserve.export import export_rank, tensor_spec, write_rank_table

HERE = Path(__file__).resolve().parent

MODEL_NAME = "minilm"
TOKENS_SHAPE = (-1, -1)
HIDDEN_SHAPE = (-1, -1, HIDDEN)


def stage_signature(stage: int, stage_size: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The (inputs, outputs) specs of a stage, -1 for the dynamic batch and sequence dims."""
    mask = tensor_spec("attention_mask", TOKENS_SHAPE, "int32")
    first = tensor_spec("input_ids", TOKENS_SHAPE, "int32") if stage == 0 else tensor_spec("hidden", HIDDEN_SHAPE)
    hidden = tensor_spec("hidden", HIDDEN_SHAPE)
    outputs = [hidden] if stage == stage_size - 1 else [hidden, mask]
    return [first, mask], outputs


def example_inputs(specs: list[dict[str, Any]]) -> list[Any]:
    """Shape-only tensors: a None dim stays dynamic in the exported graph."""
    import mindspore as ms

    return [ms.Tensor(shape=[None if d < 0 else d for d in spec["shape"]], dtype=getattr(ms, spec["dtype"]))
            for spec in specs]


def export(output_dir: Path, rank_size: int, stage_size: int, rank_table: Path | None) -> list[Path]:
    import mindspore as ms

    tp = check_layout(rank_size, stage_size)
    ms.set_context(mode=ms.GRAPH_MODE)
    weights = load_weights()
    paths = []
    for rank in range(rank_size):
        stage, tp_rank = divmod(rank, tp)
        inputs, outputs = stage_signature(stage, stage_size)
        layers = stage_layers(stage, stage_size)
        group_config = {
            "rank_size": rank_size, "stage": stage, "stage_size": stage_size, "group": WORLD_GROUP,
            "tp_size": tp, "tp_rank": tp_rank, "layers": [layers.start, layers.stop], "num_layers": LAYERS,
            "inputs": inputs, "outputs": outputs,
        }
        started = time.perf_counter()
        cell = build_stage_cell(weights, stage, stage_size, tp_rank, tp)
        path = export_rank(cell, example_inputs(inputs), output_dir, rank, MODEL_NAME, group_config)
        print(f"exported rank {rank} (stage {stage}, tp rank {tp_rank}/{tp}, layers {layers.start}-{layers.stop - 1})"
              f" in {time.perf_counter() - started:.2f} s: {path}")
        paths.append(path)
    if rank_table is not None:
        write_rank_table(rank_table, rank_size)
        print(f"wrote {rank_table}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank-size", type=int, default=4)
    parser.add_argument("--stage-size", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=HERE / "model")
    parser.add_argument("--rank-table", type=Path, default=None,
                        help="default: rank_table_<N>pcs.json next to this script")
    args = parser.parse_args()
    try:
        check_layout(args.rank_size, args.stage_size)
    except ValueError as error:
        parser.error(str(error))
    rank_table = args.rank_table or HERE / f"rank_table_{args.rank_size}pcs.json"
    export(args.output_dir, args.rank_size, args.stage_size, rank_table)


if __name__ == "__main__":
    main()
