"""Writing a per-rank model tree: `model/device{rank}/<name>.mindir` plus `group_config.json`, and a rank table.

`semi_auto_parallel` does not shard on CPU, so models are sharded by hand (each rank's Cell holds only its
slice and calls the collective op itself) and exported one rank at a time. The collective ops must name
MindSpore's CPU world group explicitly: exported outside a group, the default group would be HCCL's.
`group_config.json` tells the agent its place in the cluster and the shard's input/output signature, which the
worker uses to reject bad inputs before they reach any agent.

Lean exports (issue 23, docs/BENCHMARKS.md "Per-kernel cost"): in MindSpore 2.10 on CPU every kernel of a graph
costs ~2-25 µs per call whatever its size, and some cost far more: a slice that covers a whole axis
(`x[:, 0:n]` on an n-wide axis, a full StridedSlice) ~350 µs. So a shard's Cell should emit no kernel its math does
not need: `column_slice` gives the slice a rank takes, or None when it is the whole axis (rank_size 1); keep
[batch, seq, hidden] states flat ([batch * seq, hidden]) through a stage so a Linear is MatMul + bias Add with no
reshapes (not `ops.dense`, slower on CPU); `ops.LayerNorm` instead of its 7-kernel explicit form (but GELU written
out: the GeLU kernel is slower); a constant scale folds into the weights it follows; a dynamic shape is read once
per graph, not per layer. `graph_kernels(path)` lists what an export runs, for tests
(tests/examples/test_lean_exports.py); examples/big_model/model.py and examples/minilm/model.py show the pattern.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from zmserve.ranktable import RankEntry, write_document

WORLD_GROUP = "mccl_world_group"
"""The only group AllGather and Broadcast run on with MindSpore's CPU collectives; one per pipeline stage."""
GROUP_CONFIG_FILE = "group_config.json"
"""Beside each exported shard: its rank, the model's rank_size/stage_size, and the shard's signature."""


BOOKKEEPING_OPS = frozenset({"Constant", "Load", "UpdateState", "Depend", "MakeTuple", "TupleGetItem", "Return"})
"""MindIR nodes that are graph plumbing (parameter loads, side-effect ordering, tuples), not kernels that run."""


def column_slice(rank: int, rank_size: int, width: int) -> tuple[int, int] | None:
    """[lo, hi) of the `width` columns that rank `rank` of `rank_size` holds, or None when it holds them all:
    then the Cell must not slice at all (a whole-axis slice is a ~350 µs kernel in MindSpore 2.10 on CPU)."""
    if width % rank_size:
        raise ValueError(f"rank_size {rank_size} must divide {width}")
    if rank_size == 1:
        return None
    share = width // rank_size
    return rank * share, (rank + 1) * share


def graph_kernels(model_file: str | Path) -> list[str]:
    """The op of every kernel an exported MindIR runs per call, in graph order (e.g. ["MatMul", "Neg"]):
    its nodes (and its functions' nodes) without the bookkeeping ones. Imports MindSpore's protobuf module."""
    from mindspore.train import mind_ir_pb2

    model = mind_ir_pb2.ModelProto()
    model.ParseFromString(Path(model_file).read_bytes())
    nodes = [*model.graph.node, *(node for function in model.functions for node in function.node)]
    ops = [node.op_type.split("::")[-1].split(":")[0] for node in nodes]  # "REF::MatMul:6" -> "MatMul"
    return [op for op in ops if op not in BOOKKEEPING_OPS]


def tensor_spec(name: str, array_or_shape: Any, dtype: str = "float32") -> dict[str, Any]:
    if isinstance(array_or_shape, np.ndarray):
        return {"name": name, "dtype": array_or_shape.dtype.name, "shape": list(array_or_shape.shape)}
    return {"name": name, "dtype": dtype, "shape": list(array_or_shape)}


def export_rank(cell: Any, example_inputs: list[Any], output_dir: Path, rank: int, model_name: str,
                group_config: dict[str, Any]) -> Path:
    """Export one rank's Cell to `output_dir/device{rank}/{model_name}.mindir` and its group_config.json."""
    import mindspore as ms

    device_dir = output_dir / f"device{rank}"
    device_dir.mkdir(parents=True, exist_ok=True)
    ms.export(cell, *example_inputs, file_name=str(device_dir / model_name), file_format="MINDIR")
    (device_dir / GROUP_CONFIG_FILE).write_text(json.dumps({"rank": rank, **group_config}, indent=2))
    return device_dir / f"{model_name}.mindir"


def read_group_config(model_file: Path, config_file: Path | None = None) -> dict[str, Any] | None:
    """The group config exported beside `model_file` (or `config_file` when given), or None when there is none;
    ValueError when it is not a JSON object."""
    path = config_file or model_file.parent / GROUP_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path} is not a JSON object")
    return document


def write_rank_table(path: Path, rank_size: int, server_id: str = "127.0.0.1") -> None:
    """A single-server rank table in MindSpore's schema (device ips are placeholders on CPU)."""
    entries = [RankEntry(rank, server_id, rank, f"192.1.27.{rank + 6}") for rank in range(rank_size)]
    path.write_text(json.dumps(write_document({server_id: entries}), indent=2))
