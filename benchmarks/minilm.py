"""Row 8: all-MiniLM-L6-v2 sentence embeddings, TP2xPP2 (rank_size 4, stage_size 2) vs the unsharded model
(rank_size 1) through zmserve, vs a direct in-process GraphCell call of the (1,1) export; dynamic batching on.

    .venv/bin/python -m benchmarks.minilm [--duration 10] [--clients 1]

Batch 1 = one text per request; batch 32 = 32 texts per request (instances), each a closed loop with
`--clients` callers. Every text tokenises into the same 32-token bucket, so batches never split by shape. The
direct call does the same work in one process: tokenize, one [B, 32] GraphCell call, pool (the servable's own
functions), so it is the floor with no service and no sharding.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np

from benchmarks.benchlib import REPO, cluster, cmdline, emit, wait_quiet, write_servable

MINILM = REPO / "examples" / "minilm"
SUBJECTS = ["cat", "dog", "river", "market", "teacher", "engine", "garden", "window"]


def texts(count: int) -> list[str]:
    """Distinct sentences of 17..32 tokens (one bucket)."""
    return [f"The {SUBJECTS[i % 8]} number {i} walked slowly along the old stone bridge before the evening "
            f"rain started." for i in range(count)]


def export(outdir: Path, rank_size: int, stage_size: int) -> list[Path]:
    subprocess.run([sys.executable, str(MINILM / "export_model.py"), "--rank-size", str(rank_size), "--stage-size",
                    str(stage_size), "--output-dir", str(outdir), "--rank-table", str(outdir / "table.json")],
                   check=True, capture_output=True, env={**os.environ, "GLOG_v": "3"}, cwd=MINILM)
    return [outdir / f"device{r}" / "minilm.mindir" for r in range(rank_size)]


def servable_text(rank_size: int, stage_size: int) -> str:
    text = (MINILM / "minilm" / "servable_config.py").read_text()
    old = "declare_servable(rank_size=4, stage_size=2, with_batch_dim=True)"
    assert old in text, "servable_config.py changed: update benchmarks/minilm.py"
    return text.replace(old, f"declare_servable(rank_size={rank_size}, stage_size={stage_size}, with_batch_dim=True)")


def closed_loop(call, batch: int, clients: int, duration: float) -> dict:
    """`clients` threads calling `call(texts)` with `batch` texts each, until `duration` is up."""
    inputs = texts(batch)
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def caller() -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            call(inputs)
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=caller) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "sentences_per_s": round(len(latencies) * batch / elapsed, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2)}


def via_service(work: Path, name: str, files: list[Path], rank_size: int, stage_size: int, args) -> None:
    servables = write_servable(work / f"s_{name}", "minilm", rank_size, config=servable_text(rank_size, stage_size))
    with (cluster(work / f"c_{name}", servables, "minilm", files, {"text": texts(1)[0]}, method="embed") as local,
          local.client("embed") as client):
        def call(batch: list[str]) -> None:
            results = client.infer([{"text": t} for t in batch], timeout=120)
            assert len(results) == len(batch)

        for batch in (1, 32):
            for clients in args.clients:
                closed_loop(call, batch, clients, 3)  # unrecorded: compiles every batch shape this load makes
                load = wait_quiet()
                emit({"row": "minilm", "layout": name, "batch": batch, "clients": clients, "load1": load,
                      **closed_loop(call, batch, clients, args.duration), "command": cmdline()})


def servable_functions() -> types.ModuleType:
    """tokenize/pool from the servable's own file, without its declarations (those only run inside zmserve)."""
    source = (MINILM / "minilm" / "servable_config.py").read_text()
    source = re.sub(r"^model = distributed\.declare_servable\(.*\)$", "model = None", source, flags=re.M)
    source = source.split("@register.register_method")[0]
    module = types.ModuleType("minilm_servable_functions")
    exec(compile(source, "servable_config.py", "exec"), module.__dict__)
    return module


def direct(files: list[Path], args) -> None:
    """The (1,1) export in this process: the servable's tokenize and pool around one GraphCell call."""
    servable = servable_functions()
    from zmserve.collective import import_mindspore

    ms = import_mindspore()
    cell = ms.nn.GraphCell(ms.load(str(files[0])))

    def call(batch: list[str]) -> None:
        ids, masks = zip(*(servable.tokenize(t) for t in batch), strict=True)
        mask = np.stack(masks)
        hidden = cell(ms.Tensor(np.stack(ids)), ms.Tensor(mask))
        hidden = (hidden[0] if isinstance(hidden, tuple | list) else hidden).asnumpy()
        [servable.pool(hidden[i], mask[i]) for i in range(len(batch))]

    for batch in (1, 32):
        for _ in range(3):
            call(texts(batch))
        load = wait_quiet()
        emit({"row": "minilm", "layout": "direct_graphcell_1x1", "batch": batch, "clients": 1, "load1": load,
              **closed_loop(call, batch, 1, args.duration), "command": cmdline()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--clients", default="1")
    parser.add_argument("--layouts", default="tp2xpp2,single_rank1,direct")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        layouts = args.layouts.split(",")
        single = export(work / "m1", 1, 1)
        if "tp2xpp2" in layouts:
            via_service(work, "tp2xpp2", export(work / "m4", 4, 2), 4, 2, args)
        if "single_rank1" in layouts:
            via_service(work, "single_rank1", single, 1, 1, args)
        if "direct" in layouts:
            direct(single, args)


if __name__ == "__main__":
    main()
