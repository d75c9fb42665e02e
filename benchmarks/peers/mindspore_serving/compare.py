"""Row 5: zmserve next to MindSpore Serving 2.0.2 (the peer), same machine, same session, same 128x96·96x16 MatMul.

    .venv/bin/python -m benchmarks.peers.mindspore_serving.compare [--duration 10] [--skip-peer] [--client-processes N]

First zmserve's rows (each cluster started and stopped here): rank_size 1 p50 with 1 client (no batch dim);
rank_size 1 with dynamic batching, throughput at 16 and 32 clients; a 16 MiB Neg input (rank_size 1); and the
same latency/throughput rows at rank_size 2 and 8 to show what sharding costs. Then the peer's own harness, run
where it is installed (`../shared/peers/mindspore-serving/bench.sh` from the project root, or $PEER_DIR; RUNS=1,
DUR=--duration), whose results.jsonl is read back for its gRPC p50, best gRPC throughput and 16 MiB (neg_big)
rate; ratios follow.
The peer harness is not copied here: it is run in place, and binds 127.0.0.1:5500/1500 only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.benchlib import (
    REPO,
    bench,
    cluster,
    cmdline,
    emit,
    export_matmul,
    service_args,
    wait_quiet,
    write_servable,
)
from benchmarks.export_identity import export as export_neg

PEER_DIR = Path(os.environ.get("PEER_DIR") or (REPO / ".." / "shared" / "peers" / "mindspore-serving").resolve())
PEER_PYENV = "3.11.7:3.9.18:3.7.16"
NEG_16MIB = "4096x1024"


def zmserve_rows(work: Path, duration: float, ranks_list: list[int], client_processes: int = 0) -> dict:
    """Every zmserve number the comparison needs, keyed like `r1_p50_ms`. `client_processes` > 0 spreads the
    throughput rows' clients over that many bench processes (`zmserve bench run --processes`), as the peer's
    bench_client.py spreads its clients over processes; 0 keeps them in one process's threads."""
    x = np.ones((128, 96), np.float32)
    out: dict = {}
    for ranks in ranks_list:
        files = export_matmul(work / f"plain{ranks}", ranks)
        with cluster(work / f"c_plain{ranks}", write_servable(work / f"s_plain{ranks}", "matmul", ranks),
                     "matmul", files, {"x": x}) as local:
            load = wait_quiet()
            result = bench([*service_args(local), "--shape", "128x96", "-c", "1", "--requests", "2000",
                            "--warmup", "50"])
            emit({"row": "zmserve_latency", "rank_size": ranks, "batching": "off", "clients": 1, "load1": load,
                  **result})
            out[f"r{ranks}_p50_ms"], out[f"r{ranks}_p99_ms"] = result["p50_ms"], result["p99_ms"]
        files = export_matmul(work / f"batched{ranks}", ranks, batch_dim=True)
        with cluster(work / f"c_batched{ranks}", write_servable(work / f"s_batched{ranks}", "matmul", ranks,
                                                                 batch=True),
                     "matmul", files, {"x": x}, ["--max-batch-size", "32", "--max-batch-delay-ms", "2"]) as local:
            for clients in (16, 32):
                spread = ["--processes", str(min(client_processes, clients))] if client_processes else []
                bench([*service_args(local), *spread, "--shape", "128x96", "-c", str(clients), "--duration", "3",
                       "--timeout", "30"])  # unrecorded: compiles each batch size this load makes
                load = wait_quiet()
                result = bench([*service_args(local), *spread, "--shape", "128x96", "-c", str(clients), "--duration",
                                str(duration), "--warmup", "20", "--timeout", "30"])
                emit({"row": "zmserve_throughput", "rank_size": ranks, "batching": "on", "clients": clients,
                      "client_processes": min(client_processes, clients) or 1,
                      "load1": load, **result})
                out[f"r{ranks}_c{clients}_rps"] = result["req_per_s"]
    neg = export_neg(work / "neg")
    with cluster(work / "c_neg", write_servable(work / "s_neg", "neg", 1), "neg", [neg],
                 {"x": np.ones((2, 3), np.float32)}) as local:
        load = wait_quiet()
        result = bench([*service_args(local), "--shape", NEG_16MIB, "-c", "1", "--requests", "30", "--warmup", "3",
                        "--timeout", "60"])
        out["neg16_MiB_per_s"] = round(16 / result["p50_ms"] * 1000, 1)
        emit({"row": "zmserve_16MiB", "load1": load, "MiB_per_s": out["neg16_MiB_per_s"], **result})
    return out


def run_peer(duration: float) -> dict:
    """The peer's bench.sh in place (RUNS=1); its results.jsonl summarised into the numbers compared."""
    load = wait_quiet()
    env = {**os.environ, "PYENV_VERSION": PEER_PYENV, "RUNS": "1", "DUR": str(int(duration))}
    done = subprocess.run(["bash", str(PEER_DIR / "bench.sh")], capture_output=True, text=True, env=env,
                          timeout=1800)
    found = re.search(r"results in (\S+)", done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"peer bench failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (Path(found[1]) / "results.jsonl").read_text().splitlines()
            if line.startswith("{")]
    grpc = [r for r in rows if r.get("proto") == "grpc"]
    latency = next(r for r in grpc if r["kind"] == "latency" and r["servable"] == "matmul")
    tput = {r["conc"]: r["req_per_s"] for r in grpc if r["kind"] == "throughput" and r["servable"] == "matmul"}
    neg_latency = next(r for r in grpc if r["kind"] == "latency" and r["servable"] == "neg_big")
    neg_tput = [r["input_MiB_per_s"] for r in grpc if r["kind"] == "throughput" and r["servable"] == "neg_big"]
    peer = {"p50_ms": latency["p50_ms"], "p99_ms": latency["p99_ms"], "throughput_by_clients": tput,
            "best_rps": max(tput.values()), "neg16_MiB_per_s": round(16 / neg_latency["p50_ms"] * 1000, 1),
            "neg16_tput_MiB_per_s": max(neg_tput), "results": found[1]}
    emit({"row": "peer_mindspore_serving_grpc", "load1_at_start": load, **peer})
    return peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--ranks", default="1,2,8")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--client-processes", type=int, default=0,
                        help="spread the 16/32-client throughput rows over this many bench processes (0: threads)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        zm = zmserve_rows(Path(tmp), args.duration, [int(r) for r in args.ranks.split(",")], args.client_processes)
    if args.skip_peer:
        return
    peer = run_peer(args.duration)
    emit({"row": "vs_peer", "command": cmdline(),
          "p50_r1_over_peer": round(zm["r1_p50_ms"] / peer["p50_ms"], 2),
          "tput_c16_over_peer_best": round(zm["r1_c16_rps"] / peer["best_rps"], 2),
          "tput_c32_over_peer_best": round(zm["r1_c32_rps"] / peer["best_rps"], 2),
          "MiB16_over_peer": round(zm["neg16_MiB_per_s"] / peer["neg16_MiB_per_s"], 2),
          "MiB16_over_peer_tput": round(zm["neg16_MiB_per_s"] / peer["neg16_tput_MiB_per_s"], 2)})


if __name__ == "__main__":
    main()
