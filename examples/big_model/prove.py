"""The proof: a model too large for one memory-limited agent, served correctly by 8 agents under the same limit.

1. Export the model (the 'full' preset: 1.11e9 parameters, 4.13 GiB of float32) as TP4xPP2 and unsharded (TP1),
   streamed, unless already exported under out/.
2. Serve TP4xPP2 with every agent under --memory-limit (default 1.5G): cold start, per-agent memory, and the
   outputs of a few random inputs against the float64 numpy reference computed layer by layer from the seed.
3. Serve the unsharded model in one agent under the same limit: the launcher must give up with one line naming
   the rank, the limit and the shard size, and a client must get UNAVAILABLE naming the limit.

    .venv/bin/python examples/big_model/prove.py                     # ~4 min, ~9 GB of RAM at the peak
    .venv/bin/python examples/big_model/prove.py --preset small --limit 400M

Prints what it does, then one JSON line with every number; exits 0 only if both halves hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for path in (HERE, REPO):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from reference import forward  # noqa: E402
from weights import PRESETS, check_layout  # noqa: E402

from zmserve.client import ClientError  # noqa: E402
from zmserve.local import LocalCluster  # noqa: E402
from zmserve.streamed_export import shard_bytes  # noqa: E402
from zmserve_services.agent.memory_limit import AgentCgroup, find_hierarchy, format_size, parse_size  # noqa: E402

SEQ = 16
"""Tokens per input, fixed in the export (export_model.py says why)."""
TOLERANCE = 1e-4
"""Max |served - reference| per element; the outputs are LayerNormed (|y| up to ~5). Measured: 1.4e-5."""


def ensure_export(preset: str, rank_size: int, stage_size: int, seq: int = SEQ, root: Path = HERE / "out") -> Path:
    """The export directory of a layout; exported (with progress on stdout) unless complete with this seq."""
    output = export_dir(preset, rank_size, stage_size, root)
    if not export_complete(output, rank_size, seq):
        subprocess.run([sys.executable, str(HERE / "export_model.py"), "--preset", preset, "--rank-size",
                        str(rank_size), "--stage-size", str(stage_size), "--seq", str(seq), "--output-dir",
                        str(output)], check=True, env={**os.environ, "GLOG_v": "3"})
    return output


def export_dir(preset: str, rank_size: int, stage_size: int, root: Path = HERE / "out") -> Path:
    tp = check_layout(PRESETS[preset], rank_size, stage_size)
    return root / f"{preset}-tp{tp}pp{stage_size}"


def export_complete(output: Path, rank_size: int, seq: int = SEQ) -> bool:
    layout = output / "big" / "layout.json"
    return (all(path.is_file() for path in model_files(output, rank_size)) and layout.is_file()
            and json.loads(layout.read_text()).get("seq") == seq)


def model_files(output: Path, rank_size: int) -> list[Path]:
    return [output / "model" / f"device{rank}" / "big.mindir" for rank in range(rank_size)]


def log_events(path: Path, *names: str) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") in names:
                events.append(record)
    return events


def agent_memory(cluster: LocalCluster, launcher: str = "agents") -> list[dict[str, Any]]:
    """Per running agent: rank, VmHWM (peak RSS, shared library pages included) and its cgroup's peak charge."""
    import psutil

    hierarchy = None
    rows = []
    for child in psutil.Process(cluster.processes[launcher].pid).children():
        command = child.cmdline()
        if "zmserve_services.agent.agent" not in command:
            continue
        status = dict(line.split(":", 1) for line in Path(f"/proc/{child.pid}/status").read_text().splitlines())
        row: dict[str, Any] = {"rank": int(command[command.index("--rank") + 1]), "pid": child.pid,
                               "vm_hwm_mib": round(int(status["VmHWM"].split()[0]) / 1024),
                               "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024)}
        cgroup_path = next((line.split(":", 2)[2] for line in Path(f"/proc/{child.pid}/cgroup").read_text()
                            .splitlines() if ":memory:" in line or line.startswith("0::")), "")
        if "zmserve-agent-" in cgroup_path:
            hierarchy = hierarchy or find_hierarchy()
            peak = AgentCgroup(hierarchy.parent / Path(cgroup_path).name, hierarchy.version, 0).peak()
            row["cgroup_peak_mib"] = round(peak / 2**20) if peak is not None else None
        rows.append(row)
    return sorted(rows, key=lambda row: row["rank"])


def start_and_time(workdir: Path, output: Path, rank_size: int, agent_args: list[str],
                   instance: dict[str, np.ndarray], worker_args: list[str] | None = None) -> tuple[LocalCluster, float]:
    """A cluster that serves, and the seconds from launching its processes to the first reply (cold start)."""
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    cluster = LocalCluster(workdir, output, "big", model_files(output, rank_size), worker_args, agent_args)
    try:
        cluster.wait_ready(instance, timeout=600)
    except BaseException:
        cluster.stop()
        raise
    return cluster, time.monotonic() - started


def prove_sharded(preset: str, limit: str, workdir: Path, inputs: int) -> dict[str, Any]:
    dims = PRESETS[preset]
    output = ensure_export(preset, 8, 2)
    rng = np.random.default_rng(2024)
    xs = rng.standard_normal((inputs, SEQ, dims.hidden)).astype(np.float32)
    print(f"serving TP4xPP2 from {output} with --memory-limit {limit} per agent ...", flush=True)
    cluster, cold_start = start_and_time(workdir / "sharded", output, 8, ["--memory-limit", limit], {"x": xs[0]})
    try:
        print(f"  serving after {cold_start:.1f} s (cold start, 8 agents)", flush=True)
        with cluster.client() as client:
            futures = [client.infer_async({"x": x}, timeout=300) for x in xs]
            served = np.stack([future.result()[0]["y"] for future in futures])
        memory = agent_memory(cluster)
    finally:
        codes = cluster.stop()
    load = {e["agent_rank"]: e["load_seconds"] for e in log_events(cluster.logs["worker"], "agent_ready")}
    print(f"  computing the float64 reference for {inputs} inputs, layer by layer from the seed ...", flush=True)
    started = time.monotonic()
    expected = forward(xs, dims, seed=0)
    error = float(np.abs(served - expected).max())
    shard = shard_bytes(model_files(output, 8)[0])
    for row in memory:
        row["load_s"] = load.get(row["rank"])
        print(f"  rank {row['rank']}: shard {format_size(shard)}, peak RSS {row['vm_hwm_mib']} MiB, cgroup peak "
              f"{row.get('cgroup_peak_mib')} MiB, loaded in {row['load_s']} s", flush=True)
    ok = error <= TOLERANCE and codes == {"agents": 0, "worker": 0, "broker": 0} and len(memory) == 8
    print(f"  max |served - reference| = {error:.2e} (tolerance {TOLERANCE:g}; reference "
          f"{time.monotonic() - started:.0f} s): {'PASS' if ok else 'FAIL'}", flush=True)
    return {"ok": ok, "cold_start_s": round(cold_start, 1), "max_abs_error": error, "shard_bytes": shard,
            "agents": memory, "exit_codes": codes}


def prove_unsharded(preset: str, limit: str, workdir: Path) -> dict[str, Any]:
    dims = PRESETS[preset]
    output = ensure_export(preset, 1, 1)
    print(f"serving the unsharded model ({format_size(shard_bytes(model_files(output, 1)[0]))}) in one agent "
          f"with --memory-limit {limit} ...", flush=True)
    (workdir / "unsharded").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    cluster = LocalCluster(workdir / "unsharded", output, "big", model_files(output, 1), None,
                           ["--memory-limit", limit])
    try:
        launcher_code = cluster.processes["agents"].wait(timeout=600)
        seconds = time.monotonic() - started
        with cluster.client() as client:
            try:
                client.infer({"x": np.zeros((SEQ, dims.hidden), np.float32)}, timeout=10)
                client_error = None
            except ClientError as error:
                client_error = f"{error.code}: {error.message}"
    finally:
        codes = cluster.stop()
    failed = log_events(cluster.logs["agents"], "launcher_failed")
    why = failed[0]["why"] if failed else None
    ok = (launcher_code == 2 and why is not None and format_size(parse_size(limit)) in why
          and client_error is not None and "killed by the OOM killer" in client_error)
    print(f"  the launcher exited {launcher_code} after {seconds:.1f} s: {why}", flush=True)
    print(f"  a client gets: {client_error}", flush=True)
    print(f"  {'PASS' if ok else 'FAIL'}", flush=True)
    return {"ok": ok, "launcher_exit": launcher_code, "seconds": round(seconds, 1), "launcher_error": why,
            "client_error": client_error, "exit_codes": codes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--limit", default="1.5G", help="--memory-limit of every agent")
    parser.add_argument("--inputs", type=int, default=4, help="random inputs checked against the reference")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/zmserve-big-model-proof"),
                        help="logs of every process")
    args = parser.parse_args()
    find_hierarchy()  # fail early, with the reason, where no memory cgroup can be created
    print(f"load average {os.getloadavg()[0]:.2f}, preset {args.preset!r}: "
          f"{PRESETS[args.preset].nbytes() / 2**30:.2f} GiB of float32 weights", flush=True)
    sharded = prove_sharded(args.preset, args.limit, args.workdir, args.inputs)
    unsharded = prove_unsharded(args.preset, args.limit, args.workdir)
    print(json.dumps({"preset": args.preset, "limit": args.limit, "sharded": sharded, "unsharded": unsharded,
                      "load1": os.getloadavg()[0], "logs": str(args.workdir)}))
    sys.exit(0 if sharded["ok"] and unsharded["ok"] else 1)


if __name__ == "__main__":
    main()
