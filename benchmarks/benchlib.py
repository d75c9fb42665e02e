"""Shared helpers for the scripts in benchmarks/: quiet-machine gate, model exports, clusters, `zmserve bench`
runs and result lines. Every script prints one JSON line per measured row (stdout), so docs/BENCHMARKS.md can
quote them; the load average at the start of each measurement is part of every row, because this 2-core machine
is shared and a busy neighbour changes every number."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

from zmserve.bench.records import Record  # noqa: E402
from zmserve.bench.summary import summarize  # noqa: E402
from zmserve.local import LocalCluster  # noqa: E402

MATMUL_EXPORT = REPO / "examples" / "matmul_distributed" / "export_model.py"
QUIET_LOAD = 1.0
MAX_WAIT_S = float(os.environ.get("BENCH_MAX_WAIT_S", "120"))
"""Bound on waiting for a quiet machine before each measurement (other engineers run tests here)."""
GLOG_ENV = {**os.environ, "GLOG_v": "3"}

SERVABLE_CONFIG = """
from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size={rank_size}, stage_size={stage_size}, with_batch_dim={batch})


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_quiet(max_wait: float = MAX_WAIT_S, threshold: float = QUIET_LOAD) -> float:
    """Wait (bounded) for the 1-minute load to drop below `threshold`; return the load we measure under."""
    deadline = time.monotonic() + max_wait
    load = load1()
    while load >= threshold and time.monotonic() < deadline:
        time.sleep(5)
        load = load1()
    return load


def stamp() -> dict[str, Any]:
    """When and where: every row carries it."""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count()}


def emit(row: dict[str, Any]) -> None:
    print(json.dumps({**row, **stamp()}), flush=True)


def export_matmul(outdir: Path, rank_size: int, batch_dim: bool = False) -> list[Path]:
    """The reference MatMul sharded over `rank_size` ranks (optionally with a dynamic batch dim)."""
    if not (outdir / f"device{rank_size - 1}" / "matmul.mindir").is_file():
        args = [sys.executable, str(MATMUL_EXPORT), "--rank-size", str(rank_size), "--output-dir", str(outdir),
                "--rank-table", str(outdir / "table.json")]
        subprocess.run([*args, *(["--batch-dim"] if batch_dim else [])], check=True, capture_output=True,
                       env=GLOG_ENV)
    return [outdir / f"device{r}" / "matmul.mindir" for r in range(rank_size)]


def write_servable(root: Path, name: str, rank_size: int, stage_size: int = 1, batch: bool = False,
                   config: str | None = None) -> Path:
    """A servable dir holding `name/servable_config.py`; returns the dir to pass as --servable-dir."""
    (root / name).mkdir(parents=True, exist_ok=True)
    text = config or SERVABLE_CONFIG.format(rank_size=rank_size, stage_size=stage_size, batch=batch)
    (root / name / "servable_config.py").write_text(text)
    return root


@contextlib.contextmanager
def cluster(workdir: Path, servable_dir: Path, servable: str, model_files: list[Path], ready_instance: dict,
            worker_args: Sequence[str] = (), agent_args: Sequence[str] = (),
            method: str = "predict", colocated: bool = False) -> Iterator[LocalCluster]:
    """A LocalCluster that is ready to serve, and is stopped and reaped whatever happens (`colocated`: broker and
    worker in one `zmserve serve` process)."""
    workdir.mkdir(parents=True, exist_ok=True)
    local = LocalCluster(workdir, servable_dir, servable, model_files, list(worker_args), list(agent_args),
                         colocated=colocated, standby=True)
    try:
        local.wait_ready(ready_instance, method=method)
        yield local
    finally:
        local.stop()


def bench(args: Sequence[str], timeout: float = 900) -> dict[str, Any]:
    """`zmserve bench run ARGS` in its own process (its client threads do not share our GIL); the summary.
    Failed requests do not fail the row (--allow-errors): they are counted in its "errors"."""
    done = subprocess.run([sys.executable, "-m", "zmserve.cli", "bench", "run", "--allow-errors", *args],
                          capture_output=True, text=True, timeout=timeout, env=GLOG_ENV, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"bench failed ({done.returncode}): {done.stderr[-2000:]}")
    records = [Record.from_json(line) for line in done.stdout.splitlines() if line.strip()]
    summary = summarize(records)
    return {"requests": summary.requests, "ok": summary.ok, "errors": summary.errors,
            "req_per_s": round(summary.throughput_rps, 1),
            "p50_ms": round(summary.latency_ms.get("p50", float("nan")), 4),
            "p99_ms": round(summary.latency_ms.get("p99", float("nan")), 4),
            "mean_ms": round(summary.latency_ms.get("mean", float("nan")), 4),
            "bytes_out": summary.bytes_out, "bytes_in": summary.bytes_in, "duration_s": round(summary.duration_s, 3)}


def service_args(local: LocalCluster, servable: str | None = None) -> list[str]:
    return ["--address", local.client_address, "--servable", servable or local.servable]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc (clock ticks -> seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_pids(local: LocalCluster) -> list[int]:
    """The agent processes (children of the launchers), in start order."""
    import psutil

    pids = []
    for name, process in local.processes.items():
        if name not in ("broker", "worker"):
            pids.extend(child.pid for child in psutil.Process(process.pid).children()
                        if "zmserve_services.agent.agent" in " ".join(child.cmdline()))
    return sorted(pids)


def cmdline() -> str:
    return ".venv/bin/python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
