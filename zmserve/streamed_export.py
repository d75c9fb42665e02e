"""Export a rank whose weights never sit in memory together: MindIR graph + external data, written tensor by tensor.

`mindspore.export` needs every parameter materialised (and copies each into the protobuf), so a shard costs
about 3x its size in RAM to export, and a whole model larger than the machine's memory cannot be exported at all.
Here the Cell is built with shape-only parameters (no data), compiled into its MindIR graph once
(`compile_graph`; ranks of the same structure share it), and each parameter's data is asked for one at a time
(`fill`) and appended to `<name>_variables/data_0`, which the graph
points at through `external_data`: MindSpore's own layout for models over 1 GiB, which `mindspore.load` reads.
Peak memory is the largest single tensor, whatever the model's size.

The compile step uses a private MindSpore function (`serialization._cell_info`, the first half of
`mindspore.export`): it is isolated here, and tests/zmserve/test_streamed_export.py checks a streamed export
loads and computes what numpy does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATA_HEADER_BYTES = 64
"""MindSpore's external data file starts with 64 bytes: a byte-order flag, then zeros."""
ALIGNMENT = 64
"""Each tensor starts on a 64-byte boundary, as MindSpore writes them."""

Fill = Callable[[str, Any], np.ndarray]
"""(parameter name, the shape-only Parameter) -> its float32 data."""


def data_dir(graph_path: Path) -> Path:
    """Where the external data of a MindIR graph lives (MindSpore's naming: `<stem>_variables/`)."""
    return graph_path.parent / f"{graph_path.stem}_variables"


def shard_bytes(graph_path: Path) -> int:
    """Bytes on disk of a MindIR file and its external data, if it has any."""
    total = graph_path.stat().st_size
    variables = data_dir(graph_path)
    if variables.is_dir():
        total += sum(path.stat().st_size for path in variables.iterdir() if path.is_file())
    return total


@dataclass(frozen=True)
class CompiledGraph:
    """A Cell compiled to MindIR with no parameter data; every rank with the same structure (the tp ranks of a
    stage) can share one and differ only in the data written for it."""

    proto: bytes
    parameters: dict[str, Any]
    """name -> the Cell's shape-only Parameter (names as MindSpore gives them: the attribute paths)."""


def compile_graph(cell: Any, example_inputs: Sequence[Any]) -> CompiledGraph:
    from mindspore.train.serialization import _cell_info

    proto, parameters = _cell_info(cell, False, *example_inputs)
    return CompiledGraph(proto, dict(parameters))


def write_mindir(graph: CompiledGraph, graph_path: Path, fill: Fill,
                 on_tensor: Callable[[str, int], None] | None = None) -> int:
    """Write `graph` to `graph_path` and stream its parameters into the external data file, asking `fill` for
    each; returns the bytes of parameter data written. `on_tensor(name, nbytes)` follows each tensor."""
    from mindspore.train import mind_ir_pb2

    model = mind_ir_pb2.ModelProto()
    model.ParseFromString(graph.proto)
    variables = data_dir(graph_path)
    variables.mkdir(parents=True, exist_ok=True)
    location = f"{variables.name}/data_0"
    written = 0
    with (variables / "data_0").open("wb") as out:
        out.write((sys.byteorder == "little").to_bytes(1, sys.byteorder) + bytes(DATA_HEADER_BYTES - 1))
        offset = DATA_HEADER_BYTES
        for proto in model.graph.parameter:
            name = proto.name[proto.name.find(":") + 1:]
            value = np.ascontiguousarray(fill(name, graph.parameters[name]))
            if value.dtype != np.float32 or proto.data_type != mind_ir_pb2.TensorProto.FLOAT:
                raise ValueError(f"parameter {name}: only float32 is streamed, got {value.dtype}")
            if tuple(value.shape) != tuple(proto.dims):
                raise ValueError(f"parameter {name}: the graph wants shape {tuple(proto.dims)}, fill gave "
                                 f"{value.shape}")
            out.write(memoryview(value).cast("B"))
            padding = -value.nbytes % ALIGNMENT
            out.write(bytes(padding))
            proto.external_data.location = location
            proto.external_data.offset = offset
            proto.external_data.length = value.nbytes
            offset += value.nbytes + padding
            written += value.nbytes
            if on_tensor is not None:
                on_tensor(name, value.nbytes)
    graph_path.write_bytes(model.SerializeToString())
    return written


def export_rank_streamed(graph: CompiledGraph, output_dir: Path, rank: int, model_name: str,
                         group_config: dict[str, Any], fill: Fill,
                         on_tensor: Callable[[str, int], None] | None = None) -> Path:
    """`zmserve.export.export_rank`, streamed: `output_dir/device{rank}/{model_name}.mindir` (+ its
    `_variables/`) and group_config.json."""
    device_dir = output_dir / f"device{rank}"
    device_dir.mkdir(parents=True, exist_ok=True)
    graph_path = device_dir / f"{model_name}.mindir"
    write_mindir(graph, graph_path, fill, on_tensor)
    (device_dir / "group_config.json").write_text(json.dumps({"rank": rank, **group_config}, indent=2))
    return graph_path
