"""Row 4: what the worker pays as rank_size grows (MatMul, 1, 2, 4, 8 ranks, one client): p50 latency, and the
worker's (and broker's) CPU time per request from /proc/<pid>/stat utime+stime before and after N requests
(also with the worker's idle CPU rate, measured over --idle-seconds first, taken out: heartbeats and the 100 ms
poll loop cost CPU per second, not per request, and slow runs would otherwise look like costly requests).

    .venv/bin/python -m benchmarks.rank_scaling [--ranks 1,2,4,8] [--requests 2000]

The worker publishes each model call once on its XPUB whatever the rank count (ZeroMQ fans it out), so its CPU
per request should stay flat while latency grows with the collective.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.benchlib import (
    bench,
    cluster,
    cmdline,
    cpu_seconds,
    emit,
    export_matmul,
    service_args,
    wait_quiet,
    write_servable,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--idle-seconds", type=float, default=5, help="idle window for the worker's idle CPU rate")
    args = parser.parse_args()
    x = np.ones((128, 96), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for ranks in (int(r) for r in args.ranks.split(",")):
            files = export_matmul(work / f"model{ranks}", ranks)
            servables = write_servable(work / f"servables{ranks}", "matmul", ranks)
            with cluster(work / f"cluster{ranks}", servables, "matmul", files, {"x": x}) as local:
                worker, broker = local.processes["worker"].pid, local.processes["broker"].pid
                bench([*service_args(local), "--shape", "128x96", "--requests", "200"])
                load = wait_quiet()
                idle_started, idle_before = time.monotonic(), cpu_seconds(worker)
                time.sleep(args.idle_seconds)
                idle_rate = (cpu_seconds(worker) - idle_before) / (time.monotonic() - idle_started)
                before = cpu_seconds(worker), cpu_seconds(broker)
                started = time.monotonic()
                result = bench([*service_args(local), "--shape", "128x96", "-c", "1", "--requests",
                                str(args.requests), "--warmup", "0"])
                elapsed = time.monotonic() - started
                after = cpu_seconds(worker), cpu_seconds(broker)
                worker_cpu = after[0] - before[0]
                emit({"row": "rank_scaling", "rank_size": ranks, "load1": load, "p50_ms": result["p50_ms"],
                      "p99_ms": result["p99_ms"], "req_per_s": result["req_per_s"], "ok": result["ok"],
                      "worker_cpu_us_per_req": round(worker_cpu / result["requests"] * 1e6, 1),
                      "worker_idle_cpu_pct": round(idle_rate * 100, 2),
                      "worker_cpu_us_per_req_minus_idle": round(
                          (worker_cpu - idle_rate * elapsed) / result["requests"] * 1e6, 1),
                      "broker_cpu_us_per_req": round((after[1] - before[1]) / result["requests"] * 1e6, 1),
                      "command": cmdline()})


if __name__ == "__main__":
    main()
