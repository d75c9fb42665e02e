"""Row 1: end-to-end latency of MatMul TP2 (rank_size 2) with one client, against the same two shards called
in-process with no service (`zmserve bench run --direct`): the service's overhead in µs and as a ratio.

    .venv/bin/python -m benchmarks.latency_tp2 [--requests 2000] [--rounds 2] [--profile]

Direct and service runs alternate (`--rounds`), each after a bounded wait for a quiet machine. `--profile` also
runs `py-spy record -f raw` on the broker, the worker and agent rank 0 while a -c 1 load runs, and prints where
their samples go (benchmarks/pyspy_summary.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.benchlib import (
    agent_pids,
    bench,
    cluster,
    cmdline,
    emit,
    export_matmul,
    service_args,
    wait_quiet,
    write_servable,
)
from benchmarks.pyspy_summary import summarize_raw

PYSPY = Path(sys.executable).parent / "py-spy"


def profile(local, workdir: Path, seconds: int) -> None:
    """py-spy on broker, worker and agent rank 0 during a closed-loop -c 1 load; prints a summary per process."""
    load = subprocess.Popen([sys.executable, "-m", "zmserve.cli", "bench", "run", *service_args(local),
                             "--shape", "128x96", "-c", "1", "--duration", str(seconds + 4)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        targets = {"broker": local.processes["broker"].pid, "worker": local.processes["worker"].pid,
                   "agent0": agent_pids(local)[0]}
        spies = {name: subprocess.Popen([str(PYSPY), "record", "-p", str(pid), "-d", str(seconds), "-f", "raw",
                                         "-r", "200", "-o", str(workdir / f"{name}.raw")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name, pid in targets.items()}
        for spy in spies.values():
            spy.wait(seconds + 30)
    finally:
        load.wait(seconds + 60)
    for name in targets:
        emit({"row": "profile", "process": name, **summarize_raw(workdir / f"{name}.raw", seconds, 200)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-seconds", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = export_matmul(work / "model", 2)
        servables = write_servable(work / "servables", "matmul", 2)
        x = np.ones((128, 96), np.float32)
        with cluster(work / "cluster", servables, "matmul", files, {"x": x}) as local:
            common = ["--shape", "128x96", "--requests", str(args.requests), "--warmup", "50"]
            for round_number in range(args.rounds):
                load = wait_quiet()
                direct = bench(["--direct", "--model-files", ",".join(map(str, files)), *common])
                emit({"row": "tp2_direct", "round": round_number, "load1": load, **direct})
                load = wait_quiet()
                service = bench([*service_args(local), "-c", "1", *common])
                emit({"row": "tp2_service_c1", "round": round_number, "load1": load, **service})
                emit({"row": "tp2_overhead", "round": round_number,
                      "p50_overhead_us": round((service["p50_ms"] - direct["p50_ms"]) * 1000, 1),
                      "p99_overhead_us": round((service["p99_ms"] - direct["p99_ms"]) * 1000, 1),
                      "p50_ratio": round(service["p50_ms"] / direct["p50_ms"], 2),
                      "p99_ratio": round(service["p99_ms"] / direct["p99_ms"], 2), "command": cmdline()})
            if args.profile:
                wait_quiet()
                profile(local, work, args.profile_seconds)


if __name__ == "__main__":
    main()
