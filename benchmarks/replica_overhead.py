"""What replicas and retries cost on the hot path: the broker's and the worker's CPU per request (separate
processes, utime + stime from /proc/<pid>/stat), for this tree and for another checkout of zmserve (`--baseline`,
e.g. the commit before replicas: `git archive 1646860 | tar -x -C /tmp/zmserve-base`), in alternating rounds.

The broker now keeps each request's header and frames (references) and finds the least-outstanding replica with
ties in turn; the worker tells REQUESTS_STARTED once per loop turn before it publishes. The worst case for the tell
is no batching with one request per loop turn (one more message per request); with batching one tell covers a
batch.

    .venv/bin/python -m benchmarks.replica_overhead --baseline /tmp/zmserve-base [--rounds 2] [--duration 10]
    .venv/bin/python -m benchmarks.replica_overhead --tell-only     # the second table alone, in seconds

A second table isolates the tell's Python cost per request, in this process with the real code: the worker's
`encode(RequestsStarted(...))` and the broker's `process_worker_control` (decode, mark each request), for 1, 8 and
32 requests per loop turn (best of 5 repeats of 20,000); the send and receive of the one extra message per loop
turn are in the first table only.

MatMul rank 1 (128x96 @ 96x16), 8 client processes (`zmserve bench run --processes 8 -c 8`), without batching and
with it (--max-batch-size 32). The baseline's processes run from its tree (their working directory), so they import
its zmserve; the load generator is this tree's in both. Stdout: one JSON line per measurement, then the table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import timeit
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.benchlib import (
    REPO,
    bench,
    cluster,
    cmdline,
    cpu_seconds,
    emit,
    export_matmul,
    wait_quiet,
    write_servable,
)

MATMUL = {"x": np.ones((128, 96), np.float32)}
CONFIGS = {"no batching": [], "batching 32": ["--max-batch-size", "32", "--max-batch-delay-ms", "2"]}


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """The services this block starts run from `path` (`python -m zmserve.cli` imports zmserve from there)."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def measure(work: Path, tree: Path, files: list[Path], servables: Path, worker_args: list[str],
            duration: float) -> dict[str, Any]:
    with working_directory(tree), cluster(work, servables, "matmul", files, MATMUL, worker_args) as local:
        address = ["--address", local.client_address, "--servable", "matmul", "--shape", "128x96"]
        bench([*address, "--processes", "8", "-c", "8", "--duration", "3", "--timeout", "30"])  # warm-up
        load = wait_quiet()
        pids = {"broker": local.processes["broker"].pid, "worker": local.processes["worker"].pid}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        result = bench([*address, "--processes", "8", "-c", "8", "--duration", str(duration), "--warmup", "20",
                        "--timeout", "30"])
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    per_request = {name: round((after[name] - before[name]) / max(1, result["requests"]) * 1e6, 1) for name in pids}
    return {**per_request, "load1": load, "req_per_s": result["req_per_s"], "errors": result["errors"]}


def tell_cost() -> None:
    from zmserve.protocol import RequestsStarted, encode
    from zmserve_services.broker.broker import Broker, PendingRequest

    broker = Broker("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    worker = b"\x00worker"
    print("\n| requests per loop turn | worker: encode REQUESTS_STARTED | broker: decode and mark | frame |")
    print("|---|---|---|---|")
    try:
        for batch in (1, 8, 32):
            keys = [(b"\x00k\x8bEg", i) for i in range(batch)]
            for key in keys:
                broker.requests.add(key, PendingRequest(worker, None, "matmul"))
            clients, ids = [k[0] for k in keys], [k[1] for k in keys]
            frame = encode(RequestsStarted(clients=clients, ids=ids))
            def tell(clients: list[bytes] = clients, ids: list[int] = ids) -> bytes:
                return encode(RequestsStarted(clients=list(clients), ids=list(ids)))

            def mark(frame: bytes = frame) -> None:
                broker.process_worker_control(worker, None, frame)

            encode_us = min(timeit.repeat(tell, number=20000, repeat=5)) / 20000 / batch * 1e6
            mark_us = min(timeit.repeat(mark, number=20000, repeat=5)) / 20000 / batch * 1e6
            emit({"row": "replica_overhead_tell", "batch": batch, "encode_us": round(encode_us, 2),
                  "mark_us": round(mark_us, 2), "frame_bytes": len(frame)})
            print(f"| {batch} | {encode_us:.2f} µs/request | {mark_us:.2f} µs/request | {len(frame)} B |")
    finally:
        broker.close_sockets()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another zmserve checkout (its root)")
    parser.add_argument("--tell-only", action="store_true", help="only the second table (no services)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10)
    args = parser.parse_args()
    if args.tell_only:
        tell_cost()
        return
    if args.baseline is None:
        parser.error("--baseline is required (or --tell-only)")
    trees = {"this tree": REPO, "baseline": args.baseline.resolve()}
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="zmserve-replica-overhead-") as tmp:
        work = Path(tmp)
        for config, worker_args in CONFIGS.items():
            batch = bool(worker_args)
            files = export_matmul(work / f"model_{batch}", 1, batch_dim=batch)
            servables = write_servable(work / f"servables_{batch}", "matmul", 1, batch=batch)
            for round_index in range(args.rounds):
                for name, tree in trees.items():
                    row = measure(work / f"c_{batch}_{round_index}_{name.replace(' ', '_')}", tree, files, servables,
                                  worker_args, args.duration)
                    rows.setdefault((config, name), []).append(row)
                    emit({"row": "replica_overhead", "config": config, "tree": name, "round": round_index, **row})
    print("\n| load | tree | broker µs/request (best / worst) | worker µs/request (best / worst) | req/s | load1 |")
    print("|---|---|---|---|---|---|")
    for (config, name), measured in rows.items():
        broker = sorted(m["broker"] for m in measured)
        worker = sorted(m["worker"] for m in measured)
        rates = sorted(m["req_per_s"] for m in measured)
        loads = ", ".join(f"{m['load1']:.1f}" for m in measured)
        print(f"| {config} | {name} | {broker[0]} / {broker[-1]} | {worker[0]} / {worker[-1]} | "
              f"{rates[0]} to {rates[-1]} | {loads} |")
    tell_cost()
    print(f"\nCommand: `{cmdline()}`")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
