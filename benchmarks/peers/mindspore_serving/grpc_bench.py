"""MindSpore Serving 2.0.2's own gRPC client against zmserve's gateway and against MindSpore Serving, both up in
the same run, alternating, each point measured `--rounds` times:

- p50 / p99 of one client's sequential `infer` calls to the rank-1 MatMul (x 128x96 float32), `--calls` calls;
- throughput with 16 clients (16 threads of one process, one `Client` each) for `--seconds`;
- a 16 MiB tensor (2048x2048 float32) through `echo` (a Python stage on both): p50 and MiB/s each way.

    .venv/bin/python -m benchmarks.peers.mindspore_serving.grpc_bench ../shared/peers/mindspore-serving

The client runs in the peer's Python 3.9 (grpc_client_driver.py), the same code against both servers; the load
average is printed with each row because the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.peers.mindspore_serving.grpc_peer import (
    DEFAULT_PEER,
    mindspore_serving_grpc,
    run_driver,
    zmserve_grpc,
)
from benchmarks.peers.mindspore_serving.rest_peer import peer_dir
from tests.services.gateway.ms_rest_cases import MINDSPORE_SERVING_CONFIG, SERVABLE, ZMSERVE_CONFIG

BIG = "2048x2048"
BIG_MIB = 2048 * 2048 * 4 / 2**20


def load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def measure(peer: Path, address: str, calls: int, seconds: float, big_calls: int) -> dict[str, float]:
    latencies = sorted(run_driver(peer, "latency", address, SERVABLE, "predict", "128x96", str(calls)))
    flow = run_driver(peer, "throughput", address, SERVABLE, "predict", "128x96", "16", str(seconds))
    big = sorted(run_driver(peer, "latency", address, SERVABLE, "echo", BIG, str(big_calls)))
    return {"p50_ms": 1e3 * statistics.median(latencies), "p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))],
            "rps16": flow["calls"] / flow["seconds"], "errors16": flow["errors"],
            "big_p50_ms": 1e3 * statistics.median(big), "big_mib_s": 2 * BIG_MIB / statistics.median(big)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", nargs="?", default=DEFAULT_PEER, help="the peer's folder, relative to the repo root")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--big-calls", type=int, default=10)
    args = parser.parse_args()
    peer = peer_dir(args.peer)
    rows: dict[str, list[dict[str, float]]] = {"zmserve": [], "mindspore_serving": []}
    with tempfile.TemporaryDirectory(prefix="grpc_bench_") as tmp:
        work = Path(tmp)
        (work / "peer").mkdir()
        (work / "zmserve").mkdir()
        with mindspore_serving_grpc(peer, work / "peer", SERVABLE, MINDSPORE_SERVING_CONFIG) as theirs, \
                zmserve_grpc(work / "zmserve", SERVABLE, ZMSERVE_CONFIG) as ours:
            order = [("zmserve", ours.url), ("mindspore_serving", theirs.url)]
            print(f"{'round':>5} {'server':<18} {'p50 ms':>7} {'p99 ms':>7} {'16c req/s':>9} {'err':>4} "
                  f"{'16MiB p50 ms':>12} {'MiB/s':>7}  load", flush=True)
            for round_ in range(1, args.rounds + 1):
                for name, address in order if round_ % 2 else order[::-1]:
                    row = measure(peer, address, args.calls, args.seconds, args.big_calls)
                    rows[name].append(row)
                    print(f"{round_:>5} {name:<18} {row['p50_ms']:7.2f} {row['p99_ms']:7.2f} {row['rps16']:9.0f} "
                          f"{row['errors16']:4.0f} {row['big_p50_ms']:12.1f} {row['big_mib_s']:7.0f}  {load()}",
                          flush=True)
    print("\nratios zmserve / mindspore_serving per round (p50: lower is better; req/s, MiB/s: higher is better)")
    for ours_row, theirs_row in zip(rows["zmserve"], rows["mindspore_serving"], strict=True):
        big = ours_row["big_mib_s"] / theirs_row["big_mib_s"]
        print(f"  p50 {ours_row['p50_ms'] / theirs_row['p50_ms']:.2f}x  16-client req/s "
              f"{ours_row['rps16'] / theirs_row['rps16']:.2f}x  16 MiB {big:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
