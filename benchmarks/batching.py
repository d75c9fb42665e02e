"""Row 2: throughput of MatMul rank_size 2 at 1, 8 and 32 closed-loop clients, dynamic batching on vs off.

    .venv/bin/python -m benchmarks.batching [--duration 10] [--clients 1,8,32] [--max-batch-size 32]
                                            [--max-batch-delay-ms 2]

On: the --batch-dim export ([batch(dynamic),128,96]) under a with_batch_dim=True servable, so the worker stacks
concurrent instances into one model call (--max-batch-size/--max-batch-delay-ms). Off: the plain export under
with_batch_dim=False, one model call per instance. Both clusters run at once (idle between points) and the points
alternate off/on per client count, so both sides see the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.benchlib import bench, cluster, cmdline, emit, export_matmul, service_args, wait_quiet, write_servable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-delay-ms", type=float, default=2)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    x = np.ones((128, 96), np.float32)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        plain = export_matmul(work / "plain", 2)
        batched = export_matmul(work / "batched", 2, batch_dim=True)
        off = stack.enter_context(cluster(work / "off", write_servable(work / "s_off", "matmul", 2), "matmul",
                                          plain, {"x": x}))
        on = stack.enter_context(cluster(
            work / "on", write_servable(work / "s_on", "matmul", 2, batch=True), "matmul", batched, {"x": x},
            ["--max-batch-size", str(args.max_batch_size), "--max-batch-delay-ms", str(args.max_batch_delay_ms)]))
        for count in clients:
            results = {}
            for mode, local in (("off", off), ("on", on)):
                bench([*service_args(local), "--shape", "128x96", "-c", str(count), "--duration", "3",
                       "--timeout", "30"])  # unrecorded: MindSpore compiles each new batch size on first sight
                load = wait_quiet()
                results[mode] = bench([*service_args(local), "--shape", "128x96", "-c", str(count), "--duration",
                                       str(args.duration), "--warmup", "20", "--timeout", "30"])
                emit({"row": "batching", "batching": mode, "clients": count, "load1": load, **results[mode]})
            emit({"row": "batching_ratio", "clients": count,
                  "on_over_off": round(results["on"]["req_per_s"] / results["off"]["req_per_s"], 2),
                  "command": cmdline()})


if __name__ == "__main__":
    main()
