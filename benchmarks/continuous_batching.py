"""Continuous batching (issue 21): tokens/s of one sequence at a time vs several at once, on one cluster.

    .venv/bin/python -m benchmarks.continuous_batching [--duration 8] [--concurrency 4] [--rounds 2] [--tokens 20]

The model is the tests' tiny two-subgraph stateful model (tests/stateful_model.py), so the time is the serving
path, not the maths: per token a stage thread samples, `model.call(subgraph=1)` goes through the worker loop, the
agents stack the K/V state, run the graph and write the update. Closed loop: `c` client threads each send
`predict(prompt, max_tokens)` again as soon as the answer is back. The two concurrencies alternate (1, c, 1, c...)
on the same cluster, so both see the same machine; each row carries the 1-minute load. Also reported: the mean
sequences per decode step from the worker's `zmserve_worker_step_sequences` (how many rows a step carried).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.benchlib import cluster, cmdline, emit, load1
from tests import stateful_model
from tests.cluster import write_servable


def step_rows(metrics_url: str) -> tuple[float, float]:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    values = {line.split(" ")[0].split("{")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
              if line.startswith("zmserve_worker_step_sequences_") and "_bucket" not in line}
    return values.get("zmserve_worker_step_sequences_sum", 0.0), values.get("zmserve_worker_step_sequences_count", 0.0)


def closed_loop(local, concurrency: int, duration: float, tokens: int) -> dict:
    instance = {"prompt": np.array([3, 1], np.int32), "max_tokens": np.array(tokens, np.int32)}
    done = [0] * concurrency
    stop = time.monotonic() + duration

    def client_loop(index: int) -> None:
        with local.client("predict") as client:
            while time.monotonic() < stop:
                client.infer(instance, timeout=60)
                done[index] += 1

    before = step_rows(local.metrics["worker"])
    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    after = step_rows(local.metrics["worker"])
    steps = after[1] - before[1]
    return {"concurrency": concurrency, "requests": sum(done), "tokens_per_s": round(sum(done) * tokens / seconds, 1),
            "rows_per_decode_step": round((after[0] - before[0]) / steps, 2) if steps else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stateful_model.export(work / "model")
        servables = write_servable(work / "servables", "tiny", stateful_model.SERVABLE_CONFIG)
        ready = {"prompt": np.array([1], np.int32), "max_tokens": np.array(2, np.int32)}
        with cluster(work / "cluster", servables, "tiny", [work / "model" / "device0"], ready,
                     ["--max-sequences", str(max(16, args.concurrency))]) as local:
            closed_loop(local, args.concurrency, 2, args.tokens)  # unrecorded: each new batch size compiles once
            results: dict[int, list[float]] = {1: [], args.concurrency: []}
            for round_ in range(args.rounds):
                for concurrency in (1, args.concurrency):
                    load = load1()
                    row = closed_loop(local, concurrency, args.duration, args.tokens)
                    results[concurrency].append(row["tokens_per_s"])
                    emit({"row": "continuous_batching", "round": round_, "load1": load, **row})
            emit({"row": "continuous_batching_ratio", "concurrency": args.concurrency,
                  "tokens_per_s_ratio": [round(c / one, 2) for one, c in
                                         zip(results[1], results[args.concurrency], strict=True)],
                  "command": cmdline()})


if __name__ == "__main__":
    main()
