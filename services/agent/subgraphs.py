"""Which files one rank's model is made of, and what each subgraph takes and gives.

As in MindSpore Serving (`declare_model(model_file=["x_0.mindir", "x_1.mindir"])`, `Model.call(..., subgraph=i)`), a
model may be several graphs; per rank the launcher gets its subgraph files joined with ";" (or the rank's folder,
whose group_config.json lists them under "subgraphs"). A subgraph with a "state" entry is stateful: its last input
and last output are the per-sequence state the agent keeps (services/agent/state.py), not values the worker sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from zmserve.export import read_group_config
from zmserve.protocol import ModelSignature, ShardInfo
from zmserve_services.agent.state import StateSpec

FILE_SEPARATOR = ";"
"""Between one rank's subgraph files in a model-files entry (`a_0.mindir;a_1.mindir`)."""


@dataclass(frozen=True)
class Subgraph:
    file: Path
    signature: ModelSignature
    """The data values only (what the worker sends and gets back)."""
    state: StateSpec | None = None


def subgraph_files(model_file: str | Path) -> list[Path]:
    """The files of one rank's model entry: `a.mindir`, `a_0.mindir;a_1.mindir`, or a folder whose
    group_config.json lists its subgraphs (else its *.mindir files in name order)."""
    text = str(model_file)
    if FILE_SEPARATOR in text:
        return [Path(part) for part in text.split(FILE_SEPARATOR) if part]
    path = Path(text)
    if path.is_dir():
        entries = (read_group_config(path / "x") or {}).get("subgraphs")
        if isinstance(entries, list) and entries:
            return [path / str(entry.get("file", "")) for entry in entries if isinstance(entry, dict)]
        return sorted(path.glob("*.mindir"))
    return [path]


def read_subgraphs(files: list[Path], group_config_file: Path | None) -> tuple[ShardInfo, list[Subgraph]]:
    """What the export says about the shard (its group_config.json beside the first file, or `group_config_file`),
    and one `Subgraph` per file. ValueError when the config contradicts the files."""
    document = read_group_config(files[0], group_config_file) or {}
    top = signature_of(document)
    entries = document.get("subgraphs")
    if entries is None:
        subgraphs = [Subgraph(files[0], top)] + [Subgraph(file, ModelSignature()) for file in files[1:]]
    else:
        if not isinstance(entries, list) or len(entries) != len(files):
            raise ValueError(f"the group config lists {len(entries) if isinstance(entries, list) else 'no'} "
                             f"subgraphs, the agent was given {len(files)} files")
        subgraphs = []
        for file, entry in zip(files, entries, strict=True):
            if "file" in entry and Path(str(entry["file"])).name != file.name:
                raise ValueError(f"subgraph {len(subgraphs)} is {entry['file']} in the group config, the agent "
                                 f"was given {file}")
            state = StateSpec.from_config(entry["state"]) if entry.get("state") else None
            subgraphs.append(Subgraph(file, signature_of(entry, stateful=state is not None), state))
    known = {key: document.get(key) for key in ("rank", "rank_size", "stage", "stage_size")}
    shard = ShardInfo(signature=top if entries is None else subgraphs[0].signature,
                      subgraphs=[s.signature for s in subgraphs] if len(subgraphs) > 1 or entries else [],
                      **{k: v for k, v in known.items() if isinstance(v, int)})
    return shard, subgraphs


def signature_of(entry: dict[str, Any], stateful: bool = False) -> ModelSignature:
    return msgspec.convert({"inputs": entry.get("inputs"), "outputs": entry.get("outputs"), "stateful": stateful},
                           ModelSignature)
