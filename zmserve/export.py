"""Writing a per-rank model tree: `model/device{rank}/<name>.mindir` plus `group_config.json`, and a rank table.

`semi_auto_parallel` does not shard on CPU, so models are sharded by hand (each rank's Cell holds only its
slice and calls the collective op itself) and exported one rank at a time. The collective ops must name
MindSpore's CPU world group explicitly: exported outside a group, the default group would be HCCL's.
`group_config.json` tells the agent its place in the cluster and the shard's input/output signature, which the
worker uses to reject bad inputs before they reach any agent.
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
