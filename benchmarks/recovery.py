"""How long an agent kill while serving keeps a servable down, and where that time goes.

    .venv/bin/python -m benchmarks.recovery --rank-size 8 --kills 5

A MatMul of `--rank-size` tensor-parallel agents (one stage; 8 is the reference setup) under `--clients` clients
(one request at a time each, 5 s timeout). Once it serves, a random agent is SIGKILLed; the outage is the time
from the kill to the first success of a request sent after it. Repeated `--kills` times, each once the servable
serves again and a few seconds passed.

Each outage is split along the restart's milestones, read from the debug logs (every agent of the servable
restarts, so a milestone is when the *last* agent passes it; a step that happened before the kill, such as a
standby agent's import, counts 0):

    detect    kill -> the worker's `agent_lost`
    respawn   -> the last agent process running for the new group (`agent_started`, or a standby's `standby_used`)
    import    -> the last `mindspore_imported` after the kill
    join      -> the last `group_joined` (MindSpore's init() returned)
    load      -> the last `shard_loaded`
    warm-up   -> the last `warmed_up`
    serving   -> the worker's `serving`
    answer    -> the first success a client saw

Prints one JSON line per kill and a summary line (mean and max per step), with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.benchlib import GLOG_ENV, MATMUL_EXPORT, SERVABLE_CONFIG, load1
from benchmarks.chaos import CountingClient, Load, agent_pids, client_loop
from zmserve.local import LocalCluster

STEPS = ("detect", "respawn", "import", "join", "load", "warm-up", "serving", "answer")
RECOVERY_TIMEOUT_S = 120.0


def log_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def wall(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def last_per_rank(records: list[dict[str, Any]], events: tuple[str, ...], after: float, until: float) -> float | None:
    """When the last rank passed one of `events` in (after, until]: each rank counted at its first such event."""
    first: dict[Any, float] = {}
    for record in records:
        moment = wall(record)
        if record.get("event") in events and after < moment <= until:
            first.setdefault(record.get("rank", record.get("agent_rank")), moment)
    return max(first.values()) if first else None


def first_event(records: list[dict[str, Any]], event: str, after: float) -> float | None:
    return next((wall(r) for r in records if r.get("event") == event and wall(r) > after), None)


def standbys_ready(cluster: LocalCluster, rank_size: int) -> bool:
    """Every rank's newest standby agent has imported MindSpore (a failure long after start finds them so)."""
    records = log_records(cluster.logs["agents"])
    newest = {r["agent_rank"]: r["pid"] for r in records if r.get("event") == "standby_started"}
    ready = {r["pid"] for r in records if r.get("event") == "standby_ready"}
    used = {r["pid"] for r in records if r.get("event") == "standby_used"}
    return len(newest) == rank_size and all(pid in ready and pid not in used for pid in newest.values())


def split(cluster: LocalCluster, killed_at: float, answered_at: float) -> dict[str, float]:
    """The outage's steps, each the time from the previous milestone (0 when it was passed before)."""
    worker = log_records(cluster.logs["worker"])
    agents = log_records(cluster.logs["agents"])
    serving = first_event(worker, "serving", killed_at) or answered_at
    milestones = [
        first_event(worker, "agent_lost", killed_at),
        last_per_rank(agents, ("agent_started", "standby_used"), killed_at, serving),
        last_per_rank(agents, ("mindspore_imported",), killed_at, serving),
        last_per_rank(agents, ("group_joined",), killed_at, serving),
        last_per_rank(agents, ("shard_loaded",), killed_at, serving),
        last_per_rank(agents, ("warmed_up",), killed_at, serving),
        serving,
        answered_at,
    ]
    steps, previous = {}, killed_at
    for step, moment in zip(STEPS, milestones, strict=True):
        moment = max(moment if moment is not None else previous, previous)
        steps[step] = round(moment - previous, 2)
        previous = moment
    return steps


def matmul_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((128, 96)).astype(np.float32)


def matmul_reference(x: np.ndarray) -> np.ndarray:
    return -(x.astype(np.float64) @ np.full((96, 16), 0.5)).astype(np.float32)


def export(workdir: Path, rank_size: int) -> list[Path]:
    import subprocess

    subprocess.run([sys.executable, str(MATMUL_EXPORT), "--rank-size", str(rank_size), "--output-dir",
                    str(workdir / "model"), "--rank-table", str(workdir / "rank_table.json")],
                   check=True, capture_output=True, env=GLOG_ENV)
    return [workdir / "model" / f"device{r}" / "matmul.mindir" for r in range(rank_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank-size", type=int, default=8)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--serve-between", type=float, nargs=2, default=(3.0, 6.0),
                        help="seconds of service after a recovery before the next kill (uniform)")
    parser.add_argument("--agent-args", default="", help="extra `zmserve agent` arguments, e.g. '--no-standby'")
    parser.add_argument("--no-wait-standby", dest="wait_standby", action="store_false",
                        help="kill without waiting for the standby agents to have imported MindSpore")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="zmserve-recovery-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    model_files = export(workdir, args.rank_size)
    (workdir / "servables" / "matmul").mkdir(parents=True, exist_ok=True)
    (workdir / "servables" / "matmul" / "servable_config.py").write_text(
        SERVABLE_CONFIG.format(rank_size=args.rank_size, stage_size=1, batch=False))
    cluster = LocalCluster(workdir, workdir / "servables", "matmul", model_files,
                           extra_agent_args=args.agent_args.split(), standby=True)
    load, stop, threads, clients = Load(), threading.Event(), [], []
    rows = []
    try:
        cluster.wait_ready({"x": np.ones((128, 96), np.float32)}, timeout=300)
        for index in range(args.clients):
            client = CountingClient(cluster.client_address, "matmul", "predict")
            clients.append(client)
            thread = threading.Thread(target=client_loop, daemon=True,
                                      args=(client, load, stop, args.seed * 100 + index, 5.0, 0.02, [0], index,
                                            matmul_input, matmul_reference))
            threads.append(thread)
            thread.start()
        launcher = cluster.processes["agents"].pid
        for kill in range(args.kills):
            time.sleep(rng.uniform(*args.serve_between))  # serve a while: this is the load being measured
            cluster.check_alive()
            waited = time.monotonic()
            while args.wait_standby and "--no-standby" not in args.agent_args \
                    and not standbys_ready(cluster, args.rank_size):
                if time.monotonic() - waited > RECOVERY_TIMEOUT_S:
                    raise SystemExit(f"standby agents not ready after {RECOVERY_TIMEOUT_S} s\n{cluster.log_tails()}")
                time.sleep(0.2)
            victim = rng.choice(agent_pids(launcher))
            index, load_average = len(load), load1()
            killed_mono, killed_wall = time.monotonic(), time.time()
            os.kill(victim, 9)
            while (first := load.first_success_sent_after(killed_mono, index)) is None:
                if time.monotonic() - killed_mono > RECOVERY_TIMEOUT_S:
                    raise SystemExit(f"not serving {RECOVERY_TIMEOUT_S} s after kill {kill}\n{cluster.log_tails()}")
                cluster.check_alive()
                time.sleep(0.05)
            outage = first.done - killed_mono
            time.sleep(0.5)  # the serving line and the first answer are logged by now
            row = {"kill": kill, "outage_s": round(outage, 2), "load1": load_average,
                   **split(cluster, killed_wall, killed_wall + outage)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        for client in clients:
            client.close()
        codes = cluster.stop()
    summary: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                               "rank_size": args.rank_size, "clients": args.clients, "kills": len(rows),
                               "exit_codes": codes, "workdir": str(workdir)}
    for key in ("outage_s", *STEPS):
        values = [row[key] for row in rows]
        summary[key] = {"mean": round(sum(values) / len(values), 2), "max": max(values)} if values else None
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
