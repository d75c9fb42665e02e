"""Soak: a long steady load with dynamic batching on a 2-stage servable, watching every process's memory and file
descriptors for growth.

    .venv/bin/python -m benchmarks.soak --duration 600 --clients 32

The MLP of examples/mlp_pipeline exported with a dynamic batch (PP2: `--rank-size 2 --stage-size 2` by default),
served with_batch_dim=True (`--max-batch-size 32 --max-batch-delay-ms 2`), under `--clients` closed-loop clients
(one request of one instance at a time each, no pause). Every `--sample-every` seconds the script reads the RSS
(VmRSS) and the number of open file descriptors of every process of the deployment: broker, worker, its
schedulers, launcher, agents, standby agents, and this client process.

Checked: 0 lost (every request answered exactly once on the wire, every future resolved), 0 wrong (each instance
against the unsharded numpy forward pass within 1e-5), no process restarted, and for every process the mean RSS and
fd count of the last minute within 10% of the first minute after the warm-up (`--warmup`); the client process is
reported but not judged (it keeps a record of every request for the checks). Prints one JSON summary (with the
load average) and a table; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.chaos import MLP_EXAMPLE, CountingClient, Load, check_wire, client_loop, descendants, load_average, mlp
from zmserve.local import LocalCluster
from zmserve.supervision import process_name

GROWTH_LIMIT = 0.10
CONFIG = """
from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size={rank_size}, stage_size={stage_size}, with_batch_dim=True)


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""
WEIGHTS = mlp.make_weights(mlp.DEFAULT_LAYERS, mlp.DEFAULT_HIDDEN, mlp.DEFAULT_FFN)


def instance(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(mlp.DEFAULT_HIDDEN).astype(np.float32)


def expected(x: np.ndarray) -> np.ndarray:
    return mlp.reference_forward(x[None], WEIGHTS)[0]


def role(pid: int, cluster: LocalCluster) -> str:
    """A readable name for a process of the deployment."""
    for name, process in cluster.processes.items():
        if process.pid == pid:
            return "launcher" if name == "agents" else name
    name = process_name(pid) or "?"
    if name.startswith("zms-"):
        return name.removeprefix("zms-")
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return name
    if b"zmserve.collective" in command:
        return "scheduler (standby)" if b"--standby" in command else "scheduler"
    return name


def sample(pid: int) -> tuple[int, int] | None:
    """(RSS in KiB, open file descriptors) of a live process, None if it is gone."""
    try:
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def export(workdir: Path, rank_size: int, stage_size: int) -> list[Path]:
    subprocess.run([sys.executable, str(MLP_EXAMPLE / "export_model.py"), "--rank-size", str(rank_size),
                    "--stage-size", str(stage_size), "--dynamic-batch", "--output-dir", str(workdir / "model")],
                   check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    return [workdir / "model" / f"device{r}" / "mlp.mindir" for r in range(rank_size)]


def window_mean(points: list[tuple[float, int, int]], start: float, end: float) -> tuple[float, float] | None:
    inside = [(rss, fds) for t, rss, fds in points if start <= t < end]
    if not inside:
        return None
    return sum(r for r, _ in inside) / len(inside), sum(f for _, f in inside) / len(inside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (warm-up included)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the first measured minute")
    parser.add_argument("--window", type=float, default=60.0, help="the first and last measured windows, seconds")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rank-size", type=int, default=2)
    parser.add_argument("--stage-size", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="zmserve-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    model_files = export(workdir, args.rank_size, args.stage_size)
    (workdir / "servables" / "mlp").mkdir(parents=True, exist_ok=True)
    (workdir / "servables" / "mlp" / "servable_config.py").write_text(
        CONFIG.format(rank_size=args.rank_size, stage_size=args.stage_size))
    cluster = LocalCluster(workdir, workdir / "servables", "mlp", model_files,
                           ["--max-batch-size", "32", "--max-batch-delay-ms", "2"], standby=True)
    load, stop = Load(), threading.Event()
    clients: list[CountingClient] = []
    threads: list[threading.Thread] = []
    sent: list[list[int]] = []
    series: dict[int, list[tuple[float, int, int]]] = defaultdict(list)
    names: dict[int, str] = {}
    violations: list[str] = []
    try:
        cluster.wait_ready({"x": np.zeros(mlp.DEFAULT_HIDDEN, np.float32)})
        wait_standbys = time.monotonic()
        launcher = cluster.processes["agents"].pid
        while len(descendants(launcher)) < 2 * args.rank_size and time.monotonic() - wait_standbys < 120:
            time.sleep(0.5)  # the standby agents start once every agent has loaded: part of the steady state
        started = time.monotonic()
        for index in range(args.clients):
            client = CountingClient(cluster.client_address, "mlp", "predict")
            clients.append(client)
            sent.append([0])
            thread = threading.Thread(target=client_loop, daemon=True,
                                      args=(client, load, stop, index, args.timeout, 0.0, sent[-1], index,
                                            instance, expected))
            threads.append(thread)
            thread.start()
        while (now := time.monotonic() - started) < args.duration:
            cluster.check_alive()
            pids = [os.getpid()]
            for process in cluster.processes.values():
                pids += [process.pid, *descendants(process.pid)]
            for pid in pids:
                measured = sample(pid)
                if measured is not None:
                    names[pid] = "client" if pid == os.getpid() else role(pid, cluster)
                    series[pid].append((now, *measured))
            time.sleep(args.sample_every)
    except AssertionError as error:
        violations.append(str(error))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=args.timeout + 10)
        violations += check_wire(clients, [s[0] for s in sent])
        for client in clients:
            client.close()
        codes = cluster.stop()
    if set(codes.values()) != {0}:
        violations.append(f"exit codes {codes}")
    outcomes = load.outcomes
    lost = sum(o.code == "HUNG" for o in outcomes)
    errors = {code: sum(o.code == code for o in outcomes) for code in {o.code for o in outcomes} - {"OK"}}
    if lost or load.wrong or errors:
        violations.append(f"lost {lost}, wrong {load.wrong}, errors {errors}")
    first = (args.warmup, args.warmup + args.window)
    last = (args.duration - args.window, args.duration + 1)
    processes = []
    for pid, points in sorted(series.items(), key=lambda item: names[item[0]]):
        name = names[pid]
        spans = points[0][0] <= first[0] + args.sample_every and points[-1][0] >= last[0]
        a, b = window_mean(points, *first), window_mean(points, *last)
        if not spans or a is None or b is None:
            violations.append(f"{name} (pid {pid}) did not live through the run: a restart")
            continue
        growth = {"rss": (b[0] - a[0]) / a[0], "fds": (b[1] - a[1]) / a[1]}
        processes.append({"process": name, "pid": pid, "rss_first_mib": round(a[0] / 1024, 1),
                          "rss_last_mib": round(b[0] / 1024, 1), "rss_growth": round(growth["rss"], 4),
                          "fds_first": round(a[1], 1), "fds_last": round(b[1], 1),
                          "fds_growth": round(growth["fds"], 4)})
        for what, value in growth.items():
            if value > GROWTH_LIMIT and name != "client":  # the client keeps every outcome for the checks
                violations.append(f"{name} (pid {pid}): {what} grew {value:.1%} from the first to the last window")
    ok = sum(o.code == "OK" for o in outcomes)
    summary: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_before": load_before, "load_average_after": load_average(),
        "servable": f"mlp PP{args.stage_size} x TP{args.rank_size // args.stage_size}, batching on",
        "duration_s": args.duration, "clients": args.clients, "requests": len(outcomes), "ok": ok,
        "req_per_s": round(ok / args.duration, 1), "lost": lost, "wrong": load.wrong, "errors": errors,
        "windows_s": {"first": first, "last": [last[0], args.duration]}, "processes": processes,
        "exit_codes": codes, "violations": violations, "workdir": str(workdir),
    }
    print(json.dumps(summary, indent=2))
    print("\n| process | RSS first / last minute (MiB) | growth | open fds first / last | growth |")
    print("|---|---|---|---|---|")
    for row in processes:
        print(f"| {row['process']} | {row['rss_first_mib']} / {row['rss_last_mib']} | {row['rss_growth']:+.1%} | "
              f"{row['fds_first']:.0f} / {row['fds_last']:.0f} | {row['fds_growth']:+.1%} |")
    sys.exit(1 if violations else 0)


if __name__ == "__main__":
    main()
