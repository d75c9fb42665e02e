"""Real zmserve processes for tests: broker, worker and agent launcher started with the CLI on free loopback
ports, waited on by condition (never by sleeping), and always torn down."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from zmserve.client import Client, ClientError
from zmserve.protocol import ErrorCode
from zmserve.supervision import reap

REPO = Path(__file__).resolve().parent.parent
MATMUL_EXAMPLE = REPO / "examples" / "matmul_distributed"
READY_TIMEOUT_S = 180.0

MATMUL_CONFIG = """
from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size={rank_size}, stage_size={stage_size}, with_batch_dim=False)


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_range(count: int) -> int:
    """The first of `count` consecutive free ports."""
    for _ in range(100):
        base = free_port()
        if base + count >= 65535:
            continue
        try:
            sockets = []
            for port in range(base, base + count):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise RuntimeError("no free port range")


def export_matmul(output_dir: Path, rank_size: int) -> list[Path]:
    subprocess.run([sys.executable, str(MATMUL_EXAMPLE / "export_model.py"), "--rank-size", str(rank_size),
                    "--output-dir", str(output_dir / "model"),
                    "--rank-table", str(output_dir / f"rank_table_{rank_size}pcs.json")],
                   check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    return [output_dir / "model" / f"device{r}" / "matmul.mindir" for r in range(rank_size)]


def write_servable(servable_dir: Path, name: str, config: str) -> Path:
    folder = servable_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "servable_config.py").write_text(config)
    return servable_dir


class Cluster:
    """A broker, a worker and one agent launcher, each a real `zmserve` process."""

    def __init__(self, workdir: Path, servable_dir: Path, servable: str, model_files: list[Path] | None,
                 extra_worker_args: list[str] | None = None) -> None:
        self.workdir = workdir
        self.client_address = f"tcp://127.0.0.1:{free_port()}"
        self.worker_address = f"tcp://127.0.0.1:{free_port()}"
        self.distributed_address = f"127.0.0.1:{free_port()}"
        self.servable = servable
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.start("broker", ["broker", "--bind", self.client_address, "--worker-bind", self.worker_address])
        self.start("worker", ["worker", "--servable-dir", str(servable_dir), "--servable", servable,
                              "--distributed-address", self.distributed_address,
                              "--broker", self.worker_address, *(extra_worker_args or [])])
        if model_files is not None:
            self.start_agents("agents", model_files)

    def start_agents(self, name: str, model_files: list[Path], *extra: str) -> None:
        """One `zmserve agent` launcher for these model files (several launchers = several machines)."""
        self.start(name, ["agent", "--worker", self.distributed_address,
                          "--model-files", ",".join(str(p) for p in model_files),
                          "--agent-start-port", str(free_port_range(len(model_files))), *extra])

    def start(self, name: str, args: list[str]) -> None:
        log_path = self.workdir / f"{name}.log"
        self.logs[name] = log_path
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "zmserve.cli", *args], stdout=subprocess.DEVNULL,
            stderr=log_path.open("w"), env={**os.environ, "GLOG_v": "3"},
        )

    def client(self, method: str = "predict", servable: str | None = None, version: int = 0) -> Client:
        return Client(self.client_address, servable or self.servable, method, version)

    def wait_ready(self, instance: dict, method: str = "predict", timeout: float = READY_TIMEOUT_S) -> None:
        """Call until the servable answers something other than 'not there yet', or fail with the logs."""
        deadline = time.monotonic() + timeout
        with self.client(method) as client:
            while True:
                self.check_alive()
                try:
                    client.infer(instance, timeout=30)
                    return
                except ClientError as error:
                    if error.code not in (ErrorCode.UNAVAILABLE, ErrorCode.NOT_FOUND):
                        raise
                    if time.monotonic() > deadline:
                        raise AssertionError(f"not ready after {timeout} s: {error}\n{self.log_tails()}") from None
                time.sleep(0.2)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}\n{self.log_tails()}")

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for name, path in self.logs.items():
            text = path.read_text().splitlines()[-lines:] if path.exists() else []
            parts.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> dict[str, int]:
        """SIGTERM everything (agents first), reap it, return the exit codes."""
        codes = {}
        launchers = [name for name in self.processes if name not in ("worker", "broker")]
        for name in [*launchers, "worker", "broker"]:
            codes[name] = reap(self.processes[name], timeout=20)
        return codes


def matmul_reference(x: np.ndarray) -> np.ndarray:
    return -(x.astype(np.float64) @ np.full((96, 16), 0.5)).astype(np.float32)


MLP_EXAMPLE = REPO / "examples" / "mlp_pipeline"


def export_mlp(output_dir: Path, rank_size: int, stage_size: int, *extra: str) -> list[Path]:
    subprocess.run([sys.executable, str(MLP_EXAMPLE / "export_model.py"), "--rank-size", str(rank_size),
                    "--stage-size", str(stage_size), "--output-dir", str(output_dir / "model"), *extra],
                   check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    return [output_dir / "model" / f"device{r}" / "mlp.mindir" for r in range(rank_size)]


def load_example_module(path: Path, name: str):
    """Import an example script as a module (examples are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text().split()
        children.extend(int(c) for c in text)
    return children


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
