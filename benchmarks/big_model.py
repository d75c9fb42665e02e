"""Section 9: the 4.13 GiB examples/big_model served across memory-limited agents, per layout.

    .venv/bin/python -m benchmarks.big_model [--duration 20] [--limit 1.5G] [--fresh]

For each layout (TP4xPP2 and TP8xPP1 with every agent under --limit; TP2xPP1 under --tp2-limit when the
machine's available memory allows two ~4.5 GB agent peaks, else a 'skipped' row): export it if not already
under examples/big_model/out (--fresh: export again and time it), cold start (launching broker + worker + agents
-> first reply), per-agent shard size, peak RSS (VmHWM), cgroup peak and load time, then `zmserve bench run`
closed loops of random [16, 2048] inputs at 1 and 8 clients. Every cluster runs with --max-batch-size 1 (one
request per model call): layouts and pipelining compare call for call, and every call has the shape the agents
warmed up with (a new batch size would compile the graph in the agents while serving, holding the GIL for
seconds: export_model.py). One more TP4xPP2 cluster shows what pipelining buys: --max-inflight 1, one call in
the pipeline at a time, at 8 clients. One JSON line per row, with the command and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from prove import (
    HERE,
    SEQ,
    agent_memory,
    ensure_export,
    export_complete,
    export_dir,
    log_events,
    model_files,
    start_and_time,
)
from weights import PRESETS, rank_nbytes

from benchmarks.benchlib import bench, cmdline, emit, load1, service_args, wait_quiet
from zmserve.streamed_export import shard_bytes
from zmserve_services.agent.memory_limit import parse_size

PRESET = "full"


def export_row(rank_size: int, stage_size: int, fresh: bool) -> Path:
    """The layout's export; with `fresh` (or when missing), exported here and timed: a row with the export's
    own summary line (seconds, disk, its peak RSS)."""
    output = export_dir(PRESET, rank_size, stage_size)
    if fresh and output.exists():
        shutil.rmtree(output)
    if not export_complete(output, rank_size):
        command = [sys.executable, str(HERE / "export_model.py"), "--preset", PRESET, "--rank-size", str(rank_size),
                   "--stage-size", str(stage_size), "--seq", str(SEQ), "--output-dir", str(output)]
        load = load1()
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        summary = next(line for line in done.stdout.splitlines() if line.startswith("done: "))
        emit({"row": "export", "layout": f"TP{rank_size // stage_size}xPP{stage_size}", "summary": summary,
              "load1": load, "command": " ".join(command[1:])})
    return ensure_export(PRESET, rank_size, stage_size)


def measure_layout(args: argparse.Namespace, name: str, rank_size: int, stage_size: int, limit: str | None,
                   worker_args: list[str], clients: list[int], memory_rows: bool) -> None:
    output = export_row(rank_size, stage_size, args.fresh)
    x = np.random.default_rng(0).standard_normal((SEQ, PRESETS[PRESET].hidden)).astype(np.float32)
    agent_args = ["--memory-limit", limit] if limit else []
    load = wait_quiet()
    cluster, cold_start = start_and_time(args.workdir / name, output, rank_size, agent_args, {"x": x}, worker_args)
    try:
        setup = {"layout": name, "agents": rank_size, "memory_limit": limit, "worker_args": " ".join(worker_args)}
        serving = log_events(cluster.logs["worker"], "serving")
        if memory_rows:
            emit({"row": "cold_start", **setup, "first_reply_s": round(cold_start, 1),
                  "worker_waited_s": serving[-1]["seconds_waited"] if serving else None, "load1": load})
            loads = {e["agent_rank"]: e["load_seconds"] for e in log_events(cluster.logs["worker"], "agent_ready")}
            for row in agent_memory(cluster):
                rank = row["rank"]
                emit({"row": "agent", **setup, **row, "load_s": loads.get(rank),
                      "shard_mib": round(shard_bytes(model_files(output, rank_size)[rank]) / 2**20),
                      "weights_mib": round(rank_nbytes(PRESETS[PRESET], rank_size, stage_size, rank) / 2**20)})
        for count in clients:
            bench_args = [*service_args(cluster), "--shape", f"{SEQ}x{PRESETS[PRESET].hidden}", "--fill", "random",
                          "--seed", "1", "-c", str(count), "--duration", str(args.duration), "--timeout", "300",
                          "--warmup", str(2 * count)]
            load = wait_quiet()
            result = bench(bench_args, timeout=args.duration * 10 + 600)
            emit({"row": "serve", **setup, "clients": count, **result, "load1": load,
                  "command": "zmserve bench run " + " ".join(a for a in bench_args[4:])})
    finally:
        cluster.stop()


def tp2_fits(limit: str) -> tuple[bool, str]:
    """Two TP2 agents each peak near twice their 2.07 GiB shard while loading: run only with room to spare."""
    available = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))) * 1024
    needed = 2 * parse_size(limit) + (2 << 30)
    return available >= needed, f"MemAvailable {available / 2**30:.1f} GiB, needed {needed / 2**30:.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per closed-loop point")
    parser.add_argument("--limit", default="1.5G", help="--memory-limit of each agent in the 8-agent layouts")
    parser.add_argument("--tp2-limit", default="5G", help="--memory-limit of each of the 2 TP2xPP1 agents")
    parser.add_argument("--fresh", action="store_true", help="delete the exports and export again (timed)")
    parser.add_argument("--layouts", default="tp4pp2,pipelining,tp8pp1,tp2pp1")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/zmserve-bench-big-model"))
    args = parser.parse_args()
    emit({"row": "setup", "command": cmdline(), "preset": PRESET, "gib": round(PRESETS[PRESET].nbytes() / 2**30, 2),
          "load1": load1()})
    one_call = ["--max-batch-size", "1"]
    wanted = args.layouts.split(",")
    if "tp4pp2" in wanted:
        measure_layout(args, "TP4xPP2", 8, 2, args.limit, one_call, [1, 8], memory_rows=True)
    if "pipelining" in wanted:
        measure_layout(args, "TP4xPP2", 8, 2, args.limit, [*one_call, "--max-inflight", "1"], [8], memory_rows=False)
    if "tp8pp1" in wanted:
        measure_layout(args, "TP8xPP1", 8, 1, args.limit, one_call, [1, 8], memory_rows=True)
    if "tp2pp1" in wanted:
        fits, why = tp2_fits(args.tp2_limit)
        if fits:
            measure_layout(args, "TP2xPP1", 2, 1, args.tp2_limit, one_call, [1, 8], memory_rows=True)
        else:
            emit({"row": "skipped", "layout": "TP2xPP1", "why": why})
    print(json.dumps({"done": True, "logs": str(args.workdir), "load1": load1()}), file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("GLOG_v", "3")
    main()
