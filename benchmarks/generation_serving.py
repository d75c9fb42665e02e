"""Generation served (issue 21's goals, docs/BENCHMARKS.md "Generation served"): the GPT example behind
`zmserve serve` + its agents, driven by zmq clients that stream (`Client.generate`).

- `streams`: aggregate tokens/s of `--streams` concurrent closed-loop streams vs 1 stream, on one cluster,
  alternating (1, N, 1, N, ...), `--tokens` greedy tokens each (goal: 16 streams >= 6x one).
- `static`: continuous batching vs static batching with mixed output lengths (8 to `--tokens`): `--streams`
  closed-loop streams (a finished sequence's slot is taken by the next request at the next step) vs waves of
  `--streams` requests where a wave starts when the whole previous one has finished (goal >= 1.5x).
- `itl`: one stream's inter-token gaps (p50/p90 ms), the number the served decode step is judged by; compare it
  with `python -m benchmarks.generation_model step` for the same layout (one decode step in-process, no service).

Every row is one JSON line with the load average beside it.

    .venv/bin/python -m benchmarks.generation_serving streams --rank-size 4 --stage-size 2 [--rounds 2]
    .venv/bin/python -m benchmarks.generation_serving static --rank-size 4 --stage-size 2
    .venv/bin/python -m benchmarks.generation_serving itl --rank-size 1
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.benchlib import REPO, cmdline, emit, load1
from zmserve.client import Client, generation_inputs, infer_when_ready
from zmserve.local import LocalCluster

GPT = REPO / "examples" / "gpt"
WORDS = ("the", "king", "love", "night", "sweet", "my", "lord", "heart", "death", "fair", "good", "time")


def prompts(count: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))).capitalize() for _ in range(count)]


def generate(client: Client, prompt: str, tokens: int) -> list[float]:
    """One greedy generation, streamed: the arrival time of each token (perf_counter seconds)."""
    arrivals = []
    stream = client.generate(prompt, max_tokens=tokens, timeout=300)
    for chunk in stream:
        arrivals.extend([time.perf_counter()] * len(chunk.token_ids))
    stream.result()
    return arrivals


def closed_loop(cluster: LocalCluster, streams: int, seconds: float, lengths: Callable[[int], int]) -> dict:
    """`streams` threads, each generating again as soon as its answer is done, for `seconds`: tokens/s."""
    counts = [0] * streams
    stop_at = time.perf_counter() + seconds

    def caller(index: int) -> None:
        with cluster.client("generate") as client:
            number = 0
            while time.perf_counter() < stop_at:
                counts[index] += len(generate(client, prompts(1, seed=index * 1000 + number)[0], lengths(number)))
                number += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"tokens": sum(counts), "seconds": round(elapsed, 2), "tokens_per_s": round(sum(counts) / elapsed, 1)}


def static_waves(cluster: LocalCluster, streams: int, seconds: float, lengths: Callable[[int], int]) -> dict:
    """Waves of `streams` requests; the next wave starts when every request of this one has finished."""
    total, number = 0, 0
    started = time.perf_counter()
    clients = [cluster.client("generate") for _ in range(streams)]
    try:
        while time.perf_counter() - started < seconds:
            results: list[int] = [0] * streams

            def one(index: int, length: int, seed: int, results: list[int] = results) -> None:
                results[index] = len(generate(clients[index], prompts(1, seed=seed)[0], length))

            wave = [threading.Thread(target=one, args=(i, lengths(number + i), number * 100 + i))
                    for i in range(streams)]
            for thread in wave:
                thread.start()
            for thread in wave:
                thread.join()
            total += sum(results)
            number += streams
    finally:
        for client in clients:
            client.close()
    elapsed = time.perf_counter() - started
    return {"tokens": total, "seconds": round(elapsed, 2), "tokens_per_s": round(total / elapsed, 1)}


def serve(workdir: Path, rank_size: int, stage_size: int, max_sequences: int) -> LocalCluster:
    export = workdir / "export"
    subprocess.run([sys.executable, str(GPT / "export_model.py"), "--rank-size", str(rank_size), "--stage-size",
                    str(stage_size), "--output-dir", str(export)], check=True, capture_output=True,
                   env={**os.environ, "GLOG_v": "3"})
    folders = [export / "model" / f"device{rank}" for rank in range(rank_size)]
    (workdir / "cluster").mkdir()
    cluster = LocalCluster(workdir / "cluster", export, "gpt", folders,
                           ["--max-sequences", str(max_sequences), "--heartbeat-interval", "3"],
                           ["--heartbeat-interval", "3"], colocated=True)
    try:
        with cluster.client("generate") as client:
            infer_when_ready(client, generation_inputs("Hello", max_tokens=1), ready_within=300)
            for count in (1, 2, 4, 8, 16):  # every decode batch size compiled once before anything is timed
                threads = [threading.Thread(target=generate, args=(client, "Warm the graphs up", 4))
                           for _ in range(count)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["streams", "static", "itl"])
    parser.add_argument("--rank-size", type=int, default=4)
    parser.add_argument("--stage-size", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    layout = {"rank_size": args.rank_size, "stage_size": args.stage_size}
    with tempfile.TemporaryDirectory(prefix="zmserve-generation-") as tmp:
        cluster = serve(Path(tmp), args.rank_size, args.stage_size, max(args.streams, 1))
        try:
            for round_ in range(args.rounds):
                if args.mode == "streams":
                    fixed = lambda _: args.tokens  # noqa: E731
                    one = closed_loop(cluster, 1, args.seconds, fixed)
                    many = closed_loop(cluster, args.streams, args.seconds, fixed)
                    emit({"row": "streams", "round": round_, **layout, "streams": args.streams, "one": one,
                          "many": many, "ratio": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
                          "load1": load1(), "command": cmdline()})
                elif args.mode == "static":
                    rng = np.random.default_rng(round_)
                    mixed = rng.integers(8, args.tokens + 1, size=100_000)
                    lengths = lambda number, mixed=mixed: int(mixed[number % len(mixed)])  # noqa: E731
                    static = static_waves(cluster, args.streams, args.seconds, lengths)
                    continuous = closed_loop(cluster, args.streams, args.seconds, lengths)
                    emit({"row": "static", "round": round_, **layout, "streams": args.streams, "static": static,
                          "continuous": continuous,
                          "ratio": round(continuous["tokens_per_s"] / static["tokens_per_s"], 2),
                          "load1": load1(), "command": cmdline()})
                else:
                    with cluster.client("generate") as client:
                        gaps = []
                        for number in range(8):
                            arrivals = generate(client, prompts(1, seed=number)[0], args.tokens)
                            gaps += [b - a for a, b in itertools.pairwise(arrivals)]
                    gaps_ms = sorted(1000 * g for g in gaps)
                    emit({"row": "itl", "round": round_, **layout, "gaps": len(gaps_ms),
                          "itl_p50_ms": round(statistics.median(gaps_ms), 2),
                          "itl_p90_ms": round(gaps_ms[int(0.9 * (len(gaps_ms) - 1))], 2),
                          "load1": load1(), "command": cmdline()})
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
