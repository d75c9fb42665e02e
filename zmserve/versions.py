"""Servable versions as MindSpore Serving lays them out: numbered folders beside `servable_config.py`.

    <servable-dir>/matmul/servable_config.py      the methods (shared by every version)
    <servable-dir>/matmul/1/device0/matmul.mindir version 1's shards (and their group_config.json)
    <servable-dir>/matmul/2/device0/matmul.mindir version 2's

A worker serves one version (`--version N`); `--version 0` takes the newest folder, as MindSpore Serving's
`get_newest_version_number` does (a folder whose name is a positive number without leading zeros). A servable with
no numbered folder is version 1 (the flat layout: model files anywhere). Which version *clients* get for version
0 is the broker's rule: the newest one with a ready worker (services/broker/routing.py).
"""

from __future__ import annotations

from pathlib import Path, PurePath

from zmserve.servable import ServableConfigError


def version_folders(servable_directory: str | Path, servable_name: str) -> dict[int, Path]:
    """The numbered version folders of a servable, by number."""
    root = Path(servable_directory) / servable_name
    if not root.is_dir():
        return {}
    return {int(entry.name): entry for entry in root.iterdir()
            if entry.is_dir() and entry.name.isdigit() and entry.name == str(int(entry.name)) and int(entry.name) > 0}


def resolve_version(servable_directory: str | Path, servable_name: str, requested: int) -> int:
    """The version a worker serves: `requested`, or the newest folder for 0 (1 when there is none). A version that
    the servable's folders do not have is a ServableConfigError naming the ones they do."""
    folders = version_folders(servable_directory, servable_name)
    if requested == 0:
        return max(folders) if folders else 1
    if folders and requested not in folders:
        raise ServableConfigError(f"{Path(servable_directory) / servable_name} has no version folder {requested}; "
                                  f"its versions: {sorted(folders)}")
    return requested


def foreign_version(model_file: str, servable_name: str, version: int) -> int | None:
    """The version a shard's path says it belongs to (`.../<servable>/<k>/...`), when that is not `version`; None
    when the path names no version of this servable or names this one. Catches a launcher of a rollout's new
    version pointed at the old version's worker, which would serve the new weights under the old number."""
    parts = PurePath(model_file).parts
    for index, part in enumerate(parts[:-1]):
        following = parts[index + 1]
        if part == servable_name and following.isdigit() and following == str(int(following)):
            return int(following) if int(following) != version else None
    return None
