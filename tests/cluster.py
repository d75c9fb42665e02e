"""Test helpers around real zmserve processes: exports (each model once per session: `Exports`), servable
folders, log reading, waiting on conditions. The processes themselves are started by zmserve.local.LocalCluster
(re-exported here as Cluster; without standby agents and schedulers unless a test asks, `standby=True`)."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from zmserve.local import LocalCluster as Cluster
from zmserve.transport import free_port, free_port_range  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
MATMUL_EXAMPLE = REPO / "examples" / "matmul_distributed"
MINILM_EXAMPLE = REPO / "examples" / "minilm"

MATMUL_CONFIG = """
from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size={rank_size}, stage_size={stage_size}, with_batch_dim=False)


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y
"""


def export_matmul(output_dir: Path, rank_size: int, weight_value: float = 0.5, model_dir: Path | None = None
                  ) -> list[Path]:
    """The MatMul sharded over rank_size ranks, into output_dir/model (or model_dir: e.g. a version folder)."""
    model_dir = model_dir or output_dir / "model"
    subprocess.run([sys.executable, str(MATMUL_EXAMPLE / "export_model.py"), "--rank-size", str(rank_size),
                    "--output-dir", str(model_dir), "--weight-value", str(weight_value),
                    "--rank-table", str(output_dir / f"rank_table_{rank_size}pcs.json")],
                   check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    return [model_dir / f"device{r}" / "matmul.mindir" for r in range(rank_size)]


def write_servable(servable_dir: Path, name: str, config: str) -> Path:
    folder = servable_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "servable_config.py").write_text(config)
    return servable_dir


def matmul_reference(x: np.ndarray, weight_value: float = 0.5) -> np.ndarray:
    return -(x.astype(np.float64) @ np.full((96, 16), weight_value)).astype(np.float32)


MLP_EXAMPLE = REPO / "examples" / "mlp_pipeline"


def export_mlp(output_dir: Path, rank_size: int, stage_size: int, *extra: str) -> list[Path]:
    subprocess.run([sys.executable, str(MLP_EXAMPLE / "export_model.py"), "--rank-size", str(rank_size),
                    "--stage-size", str(stage_size), "--output-dir", str(output_dir / "model"), *extra],
                   check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    return [output_dir / "model" / f"device{r}" / "mlp.mindir" for r in range(rank_size)]


class Exports:
    """Every example model exported once per test session (the `exports` fixture of conftest.py): an export is a
    process that imports MindSpore, seconds each, and a dozen test files ask for the same few models. Tests only
    read the files; one that needs them in a folder of its own (a servable's version folder) gets a copy (`into`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seconds: dict[str, float] = {}
        """How long each export took (by folder name), for tests that report it."""

    def matmul(self, rank_size: int, weight_value: float = 0.5, into: Path | None = None) -> list[Path]:
        """The MatMul of export_matmul; its folder also holds the rank table (rank_table_<n>pcs.json)."""
        folder = self.root / f"matmul_tp{rank_size}_w{weight_value}"
        if not folder.exists():
            self.export(folder, export_matmul, rank_size, weight_value)
        return self.copied(folder, "matmul", rank_size, into)

    def mlp(self, rank_size: int, stage_size: int, *extra: str, into: Path | None = None) -> list[Path]:
        """The MLP of export_mlp (`extra`: export_model.py's options, e.g. a slow model's)."""
        folder = self.root / "_".join([f"mlp_r{rank_size}_s{stage_size}", *(e.strip("-").replace("=", "")
                                                                         for e in extra)])
        if not folder.exists():
            self.export(folder, export_mlp, rank_size, stage_size, *extra)
        return self.copied(folder, "mlp", rank_size, into)

    def minilm(self, rank_size: int, stage_size: int) -> list[Path]:
        """examples/minilm in this layout; its folder also holds the rank table (rank_table_<n>pcs.json)."""
        folder = self.root / f"minilm_r{rank_size}_s{stage_size}"
        if not folder.exists():
            self.export(folder, export_minilm, rank_size, stage_size)
        return self.copied(folder, "minilm", rank_size, None)

    def export(self, folder: Path, export: Callable[..., object], *args: object) -> None:
        """Export into a partial folder, renamed when complete: an interrupted export is never taken for a done one."""
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        started = time.monotonic()
        export(partial, *args)
        self.seconds[folder.name] = time.monotonic() - started
        partial.rename(folder)

    @staticmethod
    def copied(folder: Path, name: str, rank_size: int, into: Path | None) -> list[Path]:
        model = folder / "model"
        if into is not None:
            shutil.copytree(model, into, dirs_exist_ok=True)
            model = into
        return [model / f"device{r}" / f"{name}.mindir" for r in range(rank_size)]


def export_minilm(output_dir: Path, rank_size: int, stage_size: int) -> list[Path]:
    subprocess.run([sys.executable, str(MINILM_EXAMPLE / "export_model.py"), "--rank-size", str(rank_size),
                    "--stage-size", str(stage_size), "--output-dir", str(output_dir / "model"),
                    "--rank-table", str(output_dir / f"rank_table_{rank_size}pcs.json")],
                   check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"}, timeout=300)
    return [output_dir / "model" / f"device{r}" / "minilm.mindir" for r in range(rank_size)]


class _ExampleFolder(importlib.abc.MetaPathFinder):
    """Finds an example's sibling modules by bare name while one of its scripts loads (see load_example_module)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        candidate = self.folder / f"{fullname}.py"
        return importlib.util.spec_from_file_location(fullname, candidate) if "." not in fullname \
            and candidate.is_file() else None


def load_example_module(path: Path, name: str, keep_siblings: bool = False) -> ModuleType:
    """Import an example script as a module named `name`. Examples are scripts, not a package: they import their
    siblings by bare name (`from weights import PRESETS`), which works when they run because a script's folder is
    on sys.path. While this one loads, a finder resolves those names in its folder instead; the siblings are then
    dropped from sys.modules (the loaded modules keep their references), so that two examples' modules of one
    name (minilm's and big_model's reference.py) never meet and nothing is added to sys.path.

    `keep_siblings`: leave them registered, for a process that builds MindSpore cells from one example (MindSpore
    compiles a cell by importing its class's module again, by its bare name)."""
    finder = _ExampleFolder(path.parent)
    before = set(sys.modules)
    sys.meta_path.insert(0, finder)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # under its own, unique name (dataclasses look their module up while defined)
        spec.loader.exec_module(module)
    finally:
        sys.meta_path.remove(finder)
        for added in set() if keep_siblings else set(sys.modules) - before:
            origin = getattr(sys.modules[added], "__file__", None)
            if origin is not None and Path(origin).parent == path.parent:
                del sys.modules[added]
    return module


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # the process is gone
        return children
    for task in tasks:
        try:
            children.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:  # a thread that ended meanwhile
            continue
    return children


def agent_rank(pid: int) -> int | None:
    """The rank of the active agent process `pid` (from its process name), None if it is not one (a standby agent
    waiting to be used is not)."""
    from zmserve.supervision import process_name
    from zmserve_services.agent.agent import rank_of_process_name

    return rank_of_process_name(process_name(pid))


def agent_pids(launcher: int) -> list[int]:
    """A launcher's active agent processes, in rank order (its other children are standby agents)."""
    ranked = sorted((rank, pid) for pid in child_pids(launcher) if (rank := agent_rank(pid)) is not None)
    return [pid for _, pid in ranked]


def standby_pids(launcher: int) -> list[int]:
    """A launcher's standby agents: the children that are not active agents."""
    return [pid for pid in child_pids(launcher) if agent_rank(pid) is None]


def wait_for(condition, timeout: float, interval: float = 0.05, what: str = "condition", details=None):
    """Poll `condition` until it returns something truthy or `timeout` passes (then AssertionError, with
    `details()` appended when given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (f"\n{details()}" if details else ""))
        time.sleep(interval)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (Linux /proc: its socket inodes in the LISTEN state)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listening_endpoints(pid: int) -> set[str]:
    """Where process `pid` listens: tcp://127.0.0.1:PORT for its TCP ports, and ipc://@NAME for its abstract Unix
    sockets (what zmserve binds on loopback for its data links, PROTOCOL.md §4.5)."""
    endpoints = {f"tcp://127.0.0.1:{port}" for port in listening_ports(pid)}
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Flags 00010000: __SO_ACCEPTCON (listening); a path starting with @ is in the abstract namespace
        if len(fields) >= 8 and fields[3] == "00010000" and fields[6] in inodes and fields[7].startswith("@"):
            endpoints.add(f"ipc://{fields[7]}")
    return endpoints


def log_events(path: Path, event: str) -> list[dict]:
    """The structured log lines of `event` in a JSON-lines log file."""
    import json

    events = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == event:
                events.append(record)
    return events


def start_matmul_cluster(workdir: Path, exports: Exports, rank_size: int, colocated: bool = False,
                         curve: bool = False, standby: bool = False) -> Cluster:
    """Start a cluster for the rank_size MatMul and wait until it serves (stopped again on failure)."""
    model_files = exports.matmul(rank_size)
    servable_dir = write_servable(workdir / "servables", "matmul", MATMUL_CONFIG.format(rank_size=rank_size,
                                                                                        stage_size=1))
    cluster = Cluster(workdir, servable_dir, "matmul", model_files, colocated=colocated, curve=curve,
                      standby=standby)
    try:
        cluster.wait_ready({"x": np.ones((128, 96), np.float32)})
    except BaseException:
        cluster.stop()
        raise
    return cluster
