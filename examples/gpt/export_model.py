"""Export the GPT example sharded over `rank_size` ranks in `stage_size` pipeline stages: two MindIRs per rank.

Rank r belongs to stage r // tp and is tensor-parallel rank r % tp of it (tp = rank_size / stage_size). Per rank:

    DIR/model/device{r}/gpt_0.mindir       subgraph 0: the full graph over a chunk of T prompt tokens per row
    DIR/model/device{r}/gpt_1.mindir       subgraph 1: the incremental graph, one new token per row
    DIR/model/device{r}/group_config.json  rank, layout, signature, and "subgraphs" (data values + state)
    DIR/gpt/layout.json                    the servable's rank_size and stage_size (DIR/gpt/ is a copy of this
                                           example's servable folder when DIR is elsewhere)

B (rows) is dynamic in both graphs, T in subgraph 0. The attention cache is the state input `kv`
[L, 2, B, Hr, max_len, D] and `kv_new` [L, 2, B, Hr, T, D] the state output (generation-contract.md, section 1).

    python export_model.py --rank-size 4 --stage-size 2 --output-dir DIR   # default DIR: this folder
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from model import (  # this example's folder is on sys.path when the script runs
    WEIGHTS,
    WORLD_GROUP,
    build_stage_cell,
    check_layout,
    load_config,
    load_weights,
    stage_layers,
)

from zmserve.export import export_rank, tensor_spec, write_rank_table

HERE = Path(__file__).resolve().parent

MODEL_NAME = "gpt"
SERVABLE = HERE / MODEL_NAME
SUBGRAPHS = (False, True)
"""Subgraph i is incremental or not: 0 = full graph over a chunk (prefill), 1 = one token per row (decode)."""


def subgraph_signature(config: dict[str, Any], stage: int, stage_size: int, tp: int,
                       incremental: bool) -> dict[str, Any]:
    """One entry of group_config.json's "subgraphs" (without "file"): data inputs/outputs and the state."""
    d_model, heads = config["d_model"], config["n_heads"] // tp
    head_dim = config["d_model"] // config["n_heads"]
    layers = len(stage_layers(config, stage, stage_size))
    tokens = -1 if not incremental else 1
    positions = tensor_spec("positions", (-1,), "int32")
    hidden = tensor_spec("hidden", (-1, tokens, d_model))
    first = tensor_spec("tokens", (-1, tokens), "int32") if stage == 0 else hidden
    outputs = [tensor_spec("logits", (-1, config["vocab_size"]))] if stage == stage_size - 1 else [hidden, positions]
    return {
        "inputs": [first, positions],
        "outputs": outputs,
        "state": {"name": "kv", "dtype": "float32", "shape": [layers, 2, heads, config["max_len"], head_dim],
                  "batch_axis": 2, "time_axis": 4, "update": "kv_new", "positions": "positions"},
    }


def example_inputs(signature: dict[str, Any]) -> list[Any]:
    """Shape-only tensors for the data inputs and the state (batched along its batch axis): None stays dynamic."""
    import mindspore as ms

    state = signature["state"]
    kv_shape = list(state["shape"])
    kv_shape.insert(state["batch_axis"], -1)
    specs = [*signature["inputs"], {"dtype": state["dtype"], "shape": kv_shape}]
    return [ms.Tensor(shape=[None if d < 0 else d for d in spec["shape"]], dtype=getattr(ms, spec["dtype"]))
            for spec in specs]


def export(output_dir: Path, rank_size: int, stage_size: int, weights_dir: Path = WEIGHTS,
           rank_table: Path | None = None) -> list[list[Path]]:
    """Every rank's subgraph files, [[r0_g0, r0_g1], [r1_g0, r1_g1], ...]."""
    import mindspore as ms

    config = load_config(weights_dir)
    tp = check_layout(config, rank_size, stage_size)
    ms.set_context(mode=ms.GRAPH_MODE)
    weights = load_weights(weights_dir)
    model_dir = output_dir / "model"
    files = []
    for rank in range(rank_size):
        stage, tp_rank = divmod(rank, tp)
        layers = stage_layers(config, stage, stage_size)
        signatures = [subgraph_signature(config, stage, stage_size, tp, incremental) for incremental in SUBGRAPHS]
        subgraphs = [{"file": f"{MODEL_NAME}_{i}.mindir", **signature} for i, signature in enumerate(signatures)]
        group_config = {
            "rank_size": rank_size, "stage": stage, "stage_size": stage_size, "group": WORLD_GROUP,
            "tp_size": tp, "tp_rank": tp_rank, "layers": [layers.start, layers.stop], "num_layers": config["n_layers"],
            "inputs": signatures[0]["inputs"], "outputs": signatures[0]["outputs"], "subgraphs": subgraphs,
        }
        started = time.perf_counter()
        rank_files = []
        for index, (incremental, signature) in enumerate(zip(SUBGRAPHS, signatures, strict=True)):
            cell = build_stage_cell(weights, config, stage, stage_size, tp_rank, tp, incremental)
            rank_files.append(export_rank(cell, example_inputs(signature), model_dir, rank, f"{MODEL_NAME}_{index}",
                                          group_config))
        print(f"exported rank {rank} (stage {stage}, tp rank {tp_rank}/{tp}, layers {layers.start}-{layers.stop - 1})"
              f" in {time.perf_counter() - started:.2f} s: {', '.join(str(p) for p in rank_files)}")
        files.append(rank_files)
    if rank_table is not None:
        write_rank_table(rank_table, rank_size)
        print(f"wrote {rank_table}")
    print(f"servable: --servable-dir {output_dir} --servable {place_servable(output_dir, rank_size, stage_size).name}")
    return files


def place_servable(output_dir: Path, rank_size: int, stage_size: int) -> Path:
    """The servable folder beside the model, with layout.json: servable_config.py declares the export's
    rank_size and stage_size from it (a copy of this example's folder when the export goes elsewhere)."""
    servable = output_dir / MODEL_NAME
    if servable.resolve() != SERVABLE.resolve():
        shutil.copytree(SERVABLE, servable, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "layout.json"))
    (servable / "layout.json").write_text(json.dumps({"rank_size": rank_size, "stage_size": stage_size}) + "\n")
    return servable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank-size", type=int, default=1)
    parser.add_argument("--stage-size", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=HERE, help="model/ is written inside it")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS)
    parser.add_argument("--rank-table", type=Path, default=None,
                        help="default: rank_table_<N>pcs.json in the output dir")
    args = parser.parse_args()
    try:
        check_layout(load_config(args.weights_dir), args.rank_size, args.stage_size)
    except ValueError as error:
        parser.error(str(error))
    rank_table = args.rank_table or args.output_dir / f"rank_table_{args.rank_size}pcs.json"
    export(args.output_dir, args.rank_size, args.stage_size, args.weights_dir, rank_table)


if __name__ == "__main__":
    main()
