"""The seven targets of issue 12 ("Hot path"), each measured beside its reference in one run, and their headline
table. Every zmserve number is `zmserve serve` (broker and worker in one process) unless a row says otherwise.

    .venv/bin/python -m benchmarks.headline [--targets 1,2,3,4,5,6] [--rounds 2] [--duration 10] [--skip-peer]

  1  MatMul TP2, 1 client: p50 overhead over the direct 2-rank call (`zmserve bench run --direct`), and the hop
     floor of this topology measured now (client -> one Python forwarder -> echo, same 48 KiB payload).
  2  MatMul rank 1, 1 client: p50 vs MindSpore Serving's gRPC p50 (its own bench_client.py, 2000 requests).
  3  MatMul rank 1, batching on, 16 and 32 clients, one OS process per client (`--processes N`): req/s vs the
     peer's best gRPC req/s over 1, 4, 16 and 32 clients (its bench_client.py, one process per client).
  4  The serve process's CPU per request (/proc/<pid>/stat) in target 3's 32-client run; and the separate
     broker and worker processes (`zmserve broker` + `zmserve worker`) under the same load, each.
  5  Neg: a 16 MiB float32 input, 1 client, MiB/s vs the peer's (its neg_big model); and 64 MiB through the
     service vs a raw pyzmq REQ/REP round trip of the same bytes to another process.
  6  The serve process's CPU per request at rank 1, 2, 4, 8 (1 client), with the serve process pinned to core 0
     and every agent thread to the other cores, where the machine has them.
Target 7 (every test, fuzz and chaos run passes; docs/RELIABILITY.md holds) is not a benchmark.

Rounds alternate zmserve and the reference; each row reports the best and worst round and the load (1-minute
average) at each measurement. The peer runs from its install (../shared/peers/mindspore-serving, see
benchmarks/peers/mindspore_serving/peer.py) on free ports under the team's peer lock. Stdout: one JSON line per
measurement, then the markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bandwidth import raw_round_trips, shape_for
from benchmarks.benchlib import (
    agent_pids,
    bench,
    cluster,
    cmdline,
    cpu_seconds,
    emit,
    export_matmul,
    load1,
    service_args,
    wait_quiet,
    write_servable,
)
from benchmarks.export_identity import export as export_neg
from benchmarks.hop_floor import forwarder_round_trip
from benchmarks.peers.mindspore_serving.peer import Peer, running_peer

MATMUL = {"x": np.ones((128, 96), np.float32)}
BATCHING = ["--max-batch-size", "32", "--max-batch-delay-ms", "2"]


@dataclass
class Row:
    """One headline row: per round, the zmserve number, the reference and their ratio."""

    target: str
    what: str
    unit: str
    reference_name: str
    goal: str
    passes: Callable[[float], bool]
    higher_is_better: bool
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def add(self, zmserve: float, reference: float | None, ratio: float, load: float, **extra: Any) -> None:
        entry = {"zmserve": zmserve, "reference": reference, "ratio": ratio, "load1": load, **extra}
        self.rounds.append(entry)
        emit({"row": "headline_round", "target": self.target, "what": self.what, **entry})

    def cells(self) -> list[str]:
        if not self.rounds:
            return [self.target, self.what, "not measured", "", "", self.goal, ""]
        ranked = sorted(self.rounds, key=lambda r: r["ratio"], reverse=self.higher_is_better)
        best, worst = ranked[0], ranked[-1]
        span = lambda key, fmt: (fmt(best[key]) if best[key] == worst[key]  # noqa: E731
                                 else f"{fmt(best[key])} / {fmt(worst[key])}")
        number = lambda v: "—" if v is None else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"  # noqa: E731
        met = all(self.passes(r["ratio"]) for r in self.rounds)
        some = any(self.passes(r["ratio"]) for r in self.rounds)
        verdict = "met" if met else "met in some rounds" if some else "**missed**"
        loads = sorted(r["load1"] for r in self.rounds)
        if best["reference"] is None:  # a goal, not a reference: the number is its own verdict
            reference, ratio = "—", "—"
        else:
            reference = f"{span('reference', number)} {self.unit} ({self.reference_name})"
            ratio = span("ratio", lambda v: f"{v:.2f}")
        return [self.target, self.what, f"{span('zmserve', number)} {self.unit}", reference, ratio,
                f"{self.goal}: {verdict}",
                f"{loads[0]:.1f} to {loads[-1]:.1f}"]


def table(rows: list[Row], command: str) -> str:
    header = ["#", "what", "zmserve (best / worst)", "reference, same run", "ratio (best / worst)", "goal",
              "load"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + f"\n\nCommand: `{command}`; rounds per row: " + \
        ", ".join(f"{r.target}: {len(r.rounds)}" for r in rows)


# ---- helpers ----------------------------------------------------------------------------------------------------
def measure_cpu(pids: dict[str, int], run: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, float]]:
    """Run a load; its summary, and each process's CPU (utime + stime) per request, in µs."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = run()
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    requests = max(1, result["requests"])
    return result, {name: round((after[name] - before[name]) / requests * 1e6, 1) for name in pids}


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (threads created later inherit their creator's mask)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.sched_setaffinity(int(task.name), cpus)


def closed_loop(local: Any, clients: int, duration: float, processes: bool = True) -> dict[str, Any]:
    spread = ["--processes", str(clients)] if processes and clients > 1 else []
    return bench([*service_args(local), *spread, "--shape", "128x96", "-c", str(clients), "--duration",
                  str(duration), "--warmup", "20", "--timeout", "30"])


def latency(local: Any, requests: int = 2000) -> dict[str, Any]:
    return bench([*service_args(local), "--shape", "128x96", "-c", "1", "--requests", str(requests),
                  "--warmup", "50"])


@contextlib.contextmanager
def maybe_peer(work: Path, skip: bool) -> Iterator[Peer | None]:
    if skip:
        yield None
        return
    with running_peer(work / "peer") as peer:
        yield peer


# ---- the targets ------------------------------------------------------------------------------------------------
def target_1(work: Path, rounds: int) -> Row:
    row = Row("1", "MatMul TP2, 1 client: p50 overhead over the direct 2-rank call", "µs", "direct 2-rank call",
              "≤ 300 µs", lambda overhead: overhead <= 300, higher_is_better=False)
    files = export_matmul(work / "tp2", 2)
    with cluster(work / "c_tp2", write_servable(work / "s_tp2", "matmul", 2), "matmul", files, MATMUL,
                 colocated=True) as local:
        for _ in range(rounds):
            load = wait_quiet()
            direct = bench(["--direct", "--model-files", ",".join(map(str, files)), "--shape", "128x96",
                            "--requests", "2000", "--warmup", "50"])
            service = latency(local)
            floor = forwarder_round_trip(forwarders=1, payload=MATMUL["x"].nbytes, requests=2000)
            overhead = round((service["p50_ms"] - direct["p50_ms"]) * 1000, 1)
            row.add(overhead, round(direct["p50_ms"] * 1000, 1), overhead, load,
                    service_p50_ms=service["p50_ms"], direct_p50_ms=direct["p50_ms"],
                    hop_floor_1_forwarder_p50_us=round(floor["p50_ms"] * 1000, 1))
    return row


def target_2(work: Path, rounds: int, peer: Peer | None) -> Row:
    row = Row("2", "MatMul rank 1, 1 client, p50", "ms", "MindSpore Serving gRPC p50", "≤ 1.2x",
              lambda ratio: ratio <= 1.2, higher_is_better=False)
    files = export_matmul(work / "r1", 1)
    with cluster(work / "c_r1", write_servable(work / "s_r1", "matmul", 1), "matmul", files, MATMUL,
                 colocated=True) as local:
        for _ in range(rounds):
            load = wait_quiet()
            zm = latency(local)
            reference = peer.latency("matmul", 2000) if peer is not None else None
            ref_p50 = reference["p50_ms"] if reference else None
            row.add(zm["p50_ms"], ref_p50, round(zm["p50_ms"] / ref_p50, 2) if ref_p50 else float("nan"), load,
                    zmserve_p99_ms=zm["p99_ms"], reference_p99_ms=reference["p99_ms"] if reference else None)
    return row


def targets_3_4(work: Path, rounds: int, duration: float, peer: Peer | None) -> list[Row]:
    rows = {clients: Row("3", f"MatMul rank 1, batching, {clients} clients (1 process each)", "req/s",
                         "MindSpore Serving best gRPC req/s", "≥ 2x", lambda ratio: ratio >= 2.0,
                         higher_is_better=True) for clients in (16, 32)}
    cpu = Row("4", "serve CPU per request, rank 1, batching, 32 clients", "µs", "", "≤ 120 µs",
              lambda us: us <= 120, higher_is_better=False)
    files = export_matmul(work / "r1b", 1, batch_dim=True)
    servables = write_servable(work / "s_r1b", "matmul", 1, batch=True)
    with cluster(work / "c_r1b", servables, "matmul", files, MATMUL, BATCHING, colocated=True) as local:
        for _ in range(rounds):
            results = {}
            for clients in (16, 32):
                closed_loop(local, clients, 3)  # unrecorded: compiles the batch sizes this load makes
                load = wait_quiet()
                serve = local.processes["worker"].pid
                result, used = measure_cpu({"serve": serve}, lambda c=clients: closed_loop(local, c, duration))
                results[clients] = (result, load)
                if clients == 32:
                    cpu.add(used["serve"], None, used["serve"], load, req_per_s=result["req_per_s"])
            best, by_clients = None, {}
            if peer is not None:
                for clients in (1, 4, 16, 32):
                    by_clients[clients] = peer.throughput("matmul", clients, duration)["req_per_s"]
                best = max(by_clients.values())
            for clients, (result, load) in results.items():
                rows[clients].add(result["req_per_s"], best,
                                  round(result["req_per_s"] / best, 2) if best else float("nan"), load,
                                  errors=result["errors"], p50_ms=result["p50_ms"], peer_by_clients=by_clients)
    separate = Row("4", "broker + worker CPU per request, separate processes, same load", "µs", "",
                   "≤ 120 µs", lambda us: us <= 120, higher_is_better=False)
    with cluster(work / "c_r1b_sep", servables, "matmul", files, MATMUL, BATCHING) as local:
        for _ in range(rounds):
            closed_loop(local, 32, 3)
            load = wait_quiet()
            pids = {"broker": local.processes["broker"].pid, "worker": local.processes["worker"].pid}
            result, used = measure_cpu(pids, lambda: closed_loop(local, 32, duration))
            separate.add(round(used["broker"] + used["worker"], 1), None, round(used["broker"] + used["worker"], 1),
                         load, broker_us=used["broker"], worker_us=used["worker"], req_per_s=result["req_per_s"])
    return [rows[16], rows[32], cpu, separate]


def target_5(work: Path, rounds: int, peer: Peer | None) -> list[Row]:
    mib16 = Row("5", "Neg, 16 MiB in and out, 1 client", "MiB/s", "MindSpore Serving gRPC", "≥ 3x",
                lambda ratio: ratio >= 3.0, higher_is_better=True)
    mib64 = Row("5", "Neg, 64 MiB through the service", "MiB/s", "raw pyzmq round trip", "≥ 0.7x",
                lambda ratio: ratio >= 0.7, higher_is_better=True)
    model = export_neg(work / "neg")
    with cluster(work / "c_neg", write_servable(work / "s_neg", "neg", 1), "neg", [model],
                 {"x": np.ones((2, 3), np.float32)}, colocated=True) as local:
        for _ in range(rounds):
            load = wait_quiet()
            rows, cols = shape_for(16)
            zm = bench([*service_args(local), "--shape", f"{rows}x{cols}", "-c", "1", "--requests", "30",
                        "--warmup", "3", "--timeout", "60"])
            zm_rate = round(16 / zm["p50_ms"] * 1000, 1)
            reference = peer.latency("neg_big", 30, warmup=3) if peer is not None else None
            ref_rate = round(16 / reference["p50_ms"] * 1000, 1) if reference else None
            mib16.add(zm_rate, ref_rate, round(zm_rate / ref_rate, 2) if ref_rate else float("nan"), load,
                      zmserve_p50_ms=zm["p50_ms"], reference_p50_ms=reference["p50_ms"] if reference else None)
            load = wait_quiet()
            rows, cols = shape_for(64)
            raw = raw_round_trips(np.ones((rows, cols), np.float32), 10)
            zm = bench([*service_args(local), "--shape", f"{rows}x{cols}", "-c", "1", "--requests", "10",
                        "--warmup", "2", "--timeout", "60"])
            zm_rate = round(64 / zm["p50_ms"] * 1000, 1)
            mib64.add(zm_rate, raw["MiB_per_s"], round(zm_rate / raw["MiB_per_s"], 2), load,
                      zmserve_p50_ms=zm["p50_ms"], raw_p50_ms=raw["p50_ms"])
    return [mib16, mib64]


def target_6(work: Path, rounds: int, ranks_list: list[int]) -> Row:
    row = Row("6", f"serve CPU per request, rank {ranks_list[-1]} vs rank {ranks_list[0]}, 1 client", "µs",
              f"rank {ranks_list[0]}", "≤ 1.3x", lambda ratio: ratio <= 1.3, higher_is_better=False)
    cores = sorted(os.sched_getaffinity(0))
    serve_cores, agent_cores = ({cores[0]}, set(cores[1:])) if len(cores) > 1 else (set(cores), set(cores))
    per_round: list[dict[int, tuple[float, float]]] = [{} for _ in range(rounds)]
    for ranks in ranks_list:
        files = export_matmul(work / f"tp{ranks}", ranks)
        with cluster(work / f"c_scale{ranks}", write_servable(work / f"s_scale{ranks}", "matmul", ranks), "matmul",
                     files, MATMUL, colocated=True) as local:
            serve = local.processes["worker"].pid
            pin_process(serve, serve_cores)
            for agent in agent_pids(local):
                pin_process(agent, agent_cores)
            latency(local, 200)
            for number in range(rounds):
                load = wait_quiet()
                result, used = measure_cpu({"serve": serve}, lambda: latency(local, 1000))
                per_round[number][ranks] = (used["serve"], load)
                emit({"row": "serve_cpu_by_rank", "rank_size": ranks, "round": number, "serve_cpu_us": used["serve"],
                      "p50_ms": result["p50_ms"], "load1": load, "serve_cores": sorted(serve_cores),
                      "agent_cores": sorted(agent_cores)})
    first, last = ranks_list[0], ranks_list[-1]
    for measured in per_round:
        ratio = round(measured[last][0] / measured[first][0], 2)
        row.add(measured[last][0], measured[first][0], ratio, max(measured[last][1], measured[first][1]),
                by_rank={ranks: us for ranks, (us, _) in measured.items()})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="1,2,3,4,5,6")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10, help="seconds per throughput point")
    parser.add_argument("--ranks", default="1,2,4,8", help="target 6's rank sizes")
    parser.add_argument("--skip-peer", action="store_true", help="no MindSpore Serving (its columns stay empty)")
    args = parser.parse_args()
    targets = set(args.targets.split(","))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="zmserve-headline-") as tmp:
        work = Path(tmp)
        if "1" in targets:
            rows.append(target_1(work, args.rounds))
        if targets & {"2", "3", "4", "5"}:
            with maybe_peer(work, args.skip_peer) as peer:
                if "2" in targets:
                    rows.append(target_2(work, args.rounds, peer))
                if targets & {"3", "4"}:
                    rows += targets_3_4(work, args.rounds, args.duration, peer)
                if "5" in targets:
                    rows += target_5(work, args.rounds, peer)
        if "6" in targets:
            rows.append(target_6(work, args.rounds, [int(r) for r in args.ranks.split(",")]))
    emit({"row": "headline", "command": cmdline(), "load1_at_end": load1(),
          "rows": [dict(zip(["target", "what", "zmserve", "reference", "ratio", "goal", "load"], row.cells(),
                            strict=True)) for row in rows]})
    print("\n" + table(rows, cmdline()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
