"""Version folders as MindSpore Serving lays them out (zmserve/versions.py)."""

from pathlib import Path

import pytest

from zmserve.servable import ServableConfigError
from zmserve.versions import foreign_version, resolve_version, version_folders


def layout(root: Path, *names: str) -> Path:
    (root / "matmul").mkdir()
    (root / "matmul" / "servable_config.py").write_text("")
    for name in names:
        (root / "matmul" / name).mkdir()
    return root


def test_numbered_folders_are_versions_and_nothing_else_is(tmp_path: Path) -> None:
    layout(tmp_path, "1", "2", "10", "03", "0", "model", "v4")
    (tmp_path / "matmul" / "7").write_text("a file, not a folder")
    assert sorted(version_folders(tmp_path, "matmul")) == [1, 2, 10]


def test_version_zero_is_the_newest_folder(tmp_path: Path) -> None:
    layout(tmp_path, "1", "2", "10")
    assert resolve_version(tmp_path, "matmul", 0) == 10
    assert resolve_version(tmp_path, "matmul", 2) == 2


def test_a_servable_without_version_folders_is_version_one_or_the_one_asked(tmp_path: Path) -> None:
    layout(tmp_path)
    assert resolve_version(tmp_path, "matmul", 0) == 1
    assert resolve_version(tmp_path, "matmul", 3) == 3  # the flat layout: the number is only a label


def test_a_missing_version_folder_names_the_ones_there(tmp_path: Path) -> None:
    layout(tmp_path, "1", "2")
    with pytest.raises(ServableConfigError, match=r"has no version folder 3; its versions: \[1, 2\]"):
        resolve_version(tmp_path, "matmul", 3)


def test_a_shard_of_another_version_is_recognised_by_its_path() -> None:
    assert foreign_version("/srv/servables/matmul/2/device0/matmul.mindir", "matmul", 1) == 2
    assert foreign_version("/srv/servables/matmul/2/device0/matmul.mindir", "matmul", 2) is None
    assert foreign_version("/srv/model/device0/matmul.mindir", "matmul", 1) is None  # names no version
    assert foreign_version("/srv/other/2/device0/x.mindir", "matmul", 1) is None  # another servable's folder
