"""Where a request's time goes, hop by hop, measured (issue 23 step 3): `zmserve bench run --trace N` against a
rank-1 MatMul (separate broker, worker and agent processes, or `--colocated`: broker + worker in `zmserve serve`),
1 client, closed loop; per span the median over the traced requests, `--rounds` rounds.

    .venv/bin/python -m benchmarks.trace_hops --requests 2000 --trace 5 --rounds 2

One JSON line per round: load, the run's p50, and per span {n, p50_us, p90_us} (zmserve/trace.py hop names).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.benchlib import GLOG_ENV, REPO, cluster, emit, export_matmul, load1, write_servable


def traced_run(address: str, requests: int, every: int) -> tuple[dict, float]:
    done = subprocess.run([sys.executable, "-m", "zmserve.cli", "bench", "run", "--address", address,
                           "--servable", "matmul", "--shape", "128x96", "--requests", str(requests), "--warmup", "50",
                           "--trace", str(every)], capture_output=True, text=True, timeout=900, env=GLOG_ENV, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    latencies = [json.loads(line)["latency_ms"] for line in done.stdout.splitlines() if line.startswith("{")]
    summary = json.loads(next(line for line in done.stderr.splitlines() if line.startswith('{"traced"')))
    return summary, float(np.percentile(latencies, 50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--trace", type=int, default=5, help="trace one request in N")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--colocated", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trace_hops_") as tmp:
        work = Path(tmp)
        files = export_matmul(work / "model", 1)
        servables = write_servable(work / "servables", "matmul", 1)
        ones = {"x": np.ones((128, 96), np.float32)}
        with cluster(work / "run", servables, "matmul", files, ones, colocated=args.colocated) as local:
            for round_ in range(args.rounds):
                load = load1()
                summary, p50 = traced_run(local.client_address, args.requests, args.trace)
                emit({"bench": "trace_hops", "round": round_, "colocated": args.colocated, "load": load,
                      "p50_ms": round(p50, 4), "traced": summary["traced"], "spans": summary["spans"]})


if __name__ == "__main__":
    main()
