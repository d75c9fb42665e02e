"""The import direction (docs/ARCHITECTURE.md §1.1): application -> services -> core, never upward, checked by
import-linter with the contract in .importlinter; and the wheel's package list names every package folder."""

from __future__ import annotations

import configparser
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def layers() -> list[set[str]]:
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    lines = [line.strip() for line in config["importlinter:contract:layers"]["layers"].splitlines() if line.strip()]
    return [{name.strip() for name in line.replace("|", ":").split(":")} for line in lines]


def top_modules() -> set[str]:
    """zmserve's modules and subpackages one level down (what a layer names), and the services package."""
    names = {f"zmserve.{path.stem}" for path in (REPO / "zmserve").glob("*.py") if path.stem != "__init__"}
    names |= {f"zmserve.{path.parent.name}" for path in (REPO / "zmserve").glob("*/__init__.py")}
    return names | {"zmserve_services"}


def test_every_module_sits_in_exactly_one_layer() -> None:
    named = [name for layer in layers() for name in layer]
    assert sorted(set(named)) == sorted(named), "a module is named in two layers"
    assert set(named) == top_modules(), "name each new module of zmserve in one layer of .importlinter"


def test_no_import_points_upward() -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_wheel_lists_every_package_and_no_generic_services() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {init.parent.relative_to(REPO).parts for init in REPO.glob("zmserve/**/__init__.py")}
    folders |= {("zmserve_services", *init.parent.relative_to(REPO / "services").parts)
                for init in REPO.glob("services/**/__init__.py")}
    assert sorted(setuptools["packages"]) == sorted(".".join(parts) for parts in folders)
    assert setuptools["package-dir"] == {"zmserve": "zmserve", "zmserve_services": "services"}
    assert not any(name == "services" or name.startswith("services.") for name in setuptools["packages"])
