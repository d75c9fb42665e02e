"""What Prometheus metrics cost per request: the same MatMul (rank_size 1) served with `--metrics-bind off` and
with metrics on, runs alternating; CPU of the broker and of the worker per request (/proc utime+stime around the
run), p50 and throughput. Also: one scrape's CPU in the worker (a real Prometheus scrapes every 15 s or so), and
the recorder calls alone, in this process, per request.

    .venv/bin/python -m benchmarks.metrics_overhead [--rounds 2] [--requests 3000] [--clients 4]

No scrape runs during the measured requests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.benchlib import (
    bench,
    cmdline,
    cpu_seconds,
    emit,
    export_matmul,
    service_args,
    wait_quiet,
    write_servable,
)
from zmserve.local import LocalCluster

SHAPE = "128x96"


def start(work: Path, name: str, files: list[Path], servables: Path, metrics: bool) -> LocalCluster:
    off = [] if metrics else ["--metrics-bind", "off"]
    (work / name).mkdir(parents=True)
    local = LocalCluster(work / name, servables, "matmul", files, extra_worker_args=off, extra_broker_args=off,
                         standby=True)
    local.wait_ready({"x": np.ones((128, 96), np.float32)})
    return local


def measure(local: LocalCluster, requests: int, clients: int) -> dict:
    broker, worker = local.processes["broker"].pid, local.processes["worker"].pid
    load = wait_quiet()
    before = cpu_seconds(broker), cpu_seconds(worker)
    result = bench([*service_args(local), "--shape", SHAPE, "-c", str(clients), "--requests", str(requests),
                    "--warmup", "0"])
    after = cpu_seconds(broker), cpu_seconds(worker)
    count = result["requests"]
    return {"load1": load, "p50_ms": result["p50_ms"], "req_per_s": result["req_per_s"], "errors": result["errors"],
            "broker_cpu_us_per_req": round((after[0] - before[0]) / count * 1e6, 1),
            "worker_cpu_us_per_req": round((after[1] - before[1]) / count * 1e6, 1)}


def scrape_cpu_ms(local: LocalCluster, scrapes: int = 20) -> float:
    worker = local.processes["worker"].pid
    before = cpu_seconds(worker)
    for _ in range(scrapes):
        with urllib.request.urlopen(local.metrics["worker"], timeout=10) as response:
            response.read()
    return round((cpu_seconds(worker) - before) / scrapes * 1000, 2)


def hook_cost_us(repeat: int = 100_000) -> dict:
    """The broker's and the worker's per-request recorder calls, alone, in this process."""
    from zmserve.metrics import OK, BrokerMetrics, WorkerMetrics

    broker = BrokerMetrics(enabled=True)
    started = time.perf_counter()
    for _ in range(repeat):
        broker.received(49_300)
        now = time.monotonic()
        broker.finished(broker.series("bench", "predict", 1), OK, now, now)
        broker.sent([b"h" * 63, b"y" * 8192])
    broker_us = (time.perf_counter() - started) / repeat * 1e6
    worker = WorkerMetrics("bench", 1, enabled=True)
    frames = [np.zeros((128, 96), np.float32)]
    started = time.perf_counter()
    for _ in range(repeat):
        published = worker.call_published(time.perf_counter(), 1, frames)
        worker.call_returned(published, [b"y" * 8192])
        worker.request_done("predict", OK, published)
    worker_us = (time.perf_counter() - started) / repeat * 1e6
    return {"broker_hooks_us": round(broker_us, 2), "worker_hooks_us": round(worker_us, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    emit({"row": "metrics_hooks", **hook_cost_us(), "command": cmdline()})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = export_matmul(work / "model", 1)
        servables = write_servable(work / "servables", "matmul", 1)
        clusters = {"off": start(work, "off", files, servables, metrics=False),
                    "on": start(work, "on", files, servables, metrics=True)}
        try:
            for local in clusters.values():  # warm both up the same way
                bench([*service_args(local), "--shape", SHAPE, "-c", str(args.clients), "--requests", "300"])
            for round_ in range(args.rounds):
                for name in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                    emit({"row": "metrics_overhead", "metrics": name, "round": round_, "clients": args.clients,
                          "requests": args.requests, **measure(clusters[name], args.requests, args.clients),
                          "command": cmdline()})
            emit({"row": "metrics_scrape", "worker_cpu_ms_per_scrape": scrape_cpu_ms(clusters["on"]),
                  "command": cmdline()})
        finally:
            for local in clusters.values():
                local.stop()


if __name__ == "__main__":
    main()
