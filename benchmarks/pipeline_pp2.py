"""PP2 pipelined vs one request at a time: throughput of a 2-stage MLP (1 agent per stage, each pinned to its
own core), served by the same cluster code with `--max-inflight 64` (stages overlap) and `--max-inflight 1`
(one model call in the pipeline at a time).

    .venv/bin/python -m benchmarks.pipeline_pp2 [--requests 300] [--concurrency 8]

Prints one JSON line per mode and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.benchlib import wait_quiet
from zmserve.local import LocalCluster

REPO = Path(__file__).resolve().parent.parent
CONFIG = """
from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size=2, stage_size=2, with_batch_dim=False)


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""


def measure(workdir: Path, model_files: list[Path], max_inflight: int, requests: int, concurrency: int,
            x: np.ndarray) -> dict:
    servable_dir = workdir / f"servables-{max_inflight}"
    (servable_dir / "mlp").mkdir(parents=True, exist_ok=True)  # modes repeat (1, 64, 1, 64)
    (servable_dir / "mlp" / "servable_config.py").write_text(CONFIG)
    cluster = LocalCluster(workdir, servable_dir, "mlp", model_files, ["--max-inflight", str(max_inflight)],
                           ["--pin-cpus"], standby=True)
    try:
        cluster.wait_ready({"x": x})
        with cluster.client() as client:
            for _ in range(20):
                client.infer({"x": x})
            latencies: list[float] = []

            def one(_: int) -> None:
                started = time.perf_counter()
                client.infer({"x": x}, timeout=120)
                latencies.append(time.perf_counter() - started)

            load = wait_quiet()
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, range(requests)))
            elapsed = time.perf_counter() - started
    finally:
        cluster.stop()
    return {"max_inflight": max_inflight, "load1": load, "requests": requests, "concurrency": concurrency,
            "seconds": round(elapsed, 3), "req_per_s": round(requests / elapsed, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        subprocess.run([sys.executable, str(REPO / "examples/mlp_pipeline/export_model.py"), "--rank-size", "2",
                        "--stage-size", "2", "--batch", str(args.batch), "--hidden", str(args.hidden),
                        "--ffn", str(args.ffn), "--layers", str(args.layers), "--output-dir",
                        str(workdir / "model")], check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
        model_files = [workdir / "model" / f"device{r}" / "mlp.mindir" for r in range(2)]
        x = np.random.default_rng(0).standard_normal((args.batch, args.hidden)).astype(np.float32)
        results = [measure(workdir, model_files, m, args.requests, args.concurrency, x) for m in (1, 64, 1, 64)]
    for result in results:
        print(json.dumps(result))
    serial = max(r["req_per_s"] for r in results if r["max_inflight"] == 1)
    pipelined = max(r["req_per_s"] for r in results if r["max_inflight"] == 64)
    print(json.dumps({"pipelined_over_serial": round(pipelined / serial, 2),
                      "model": f"MLP {args.layers} layers, batch {args.batch}, hidden {args.hidden}, ffn {args.ffn}",
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
