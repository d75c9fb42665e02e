"""Generation: the model call with no service in between (docs/BENCHMARKS.md, "Generation: the model call").

Three measurements on the examples/gpt export, each alternating its variants (at least 2 rounds) and printing one
JSON line per measured row with the load average beside it:

- `incremental`: 128 greedy tokens after a 16-token prompt, TP1 in-process: the contract's way (prefill with
  subgraph 0, then subgraph 1 with the KV state, one token per step) vs re-running the full graph (subgraph 0)
  over the whole sequence for every token. Both must give the same tokens; tokens/s and the ratio.
- `step`: one decode step (subgraph 1) of `--batch` sequences for a layout (`--rank-size`, `--stage-size`):
  p50 ms per step and tokens/s, the baseline a served inter-token latency is compared against.
- `state`: per decode step at 1 and 16 sequences, TP1: the contract's explicit state (the KV stacked from numpy,
  kv_new written back, as an agent does) vs in-graph state (Parameters updated with ScatterNdUpdate inside the
  graph, model.build_stage_cell(in_graph_slots=...)). Checks first that both give the same logits.

    .venv/bin/python -m benchmarks.generation_model incremental [--rounds 2]
    .venv/bin/python -m benchmarks.generation_model step --rank-size 4 --stage-size 2 --batch 1,16
    .venv/bin/python -m benchmarks.generation_model state --batch 1,16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.benchlib import REPO, emit, load1

EXAMPLE = REPO / "examples" / "gpt"

from tests.cluster import load_example_module  # noqa: E402

direct = load_example_module(EXAMPLE / "direct.py", "gpt_direct", keep_siblings=True)
export = load_example_module(EXAMPLE / "export_model.py", "gpt_export", keep_siblings=True).export
_model = load_example_module(EXAMPLE / "model.py", "gpt_model", keep_siblings=True)
build_stage_cell, load_config, load_weights = _model.build_stage_cell, _model.load_config, _model.load_weights
Reference = load_example_module(EXAMPLE / "reference.py", "gpt_reference").Reference

from zmserve.collective import ShardModel, import_mindspore  # noqa: E402
from zmserve.sampling import SamplingParams  # noqa: E402

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
NEVER = -1
"""An end-of-text id no token has: every run makes exactly the tokens asked for."""


def prompt_tokens(reference: Reference, count: int) -> list[int]:
    tokens = reference.encode(PROMPT * 4)[:count]
    assert len(tokens) == count
    return tokens


def exported(root: Path, rank_size: int, stage_size: int) -> Path:
    model_dir = root / f"r{rank_size}s{stage_size}" / "model"
    if not (model_dir / f"device{rank_size - 1}" / "gpt_1.mindir").is_file():
        export(model_dir.parent, rank_size, stage_size)
    return model_dir


# ---- incremental decoding vs re-running the full graph ----------------------------------------------------------
def incremental(args: argparse.Namespace, root: Path) -> None:
    reference = Reference()
    max_len = reference.config["max_len"]
    pipeline = direct.open_pipeline(exported(root, 1, 1))
    prompt = prompt_tokens(reference, args.prompt_tokens)
    sequence = iter(range(10**6))

    def with_state() -> list[int]:
        params = SamplingParams(max_tokens=args.tokens)
        return direct.generate(pipeline, [prompt], [params], NEVER, max_len)[0].token_ids

    def full_rerun() -> list[int]:
        tokens = list(prompt)
        for _ in range(args.tokens):
            row = next(sequence)
            (logits,) = pipeline.call(0, [row], [np.asarray([tokens], np.int32), np.zeros(1, np.int32)])
            pipeline.release([row])
            tokens.append(int(np.argmax(logits[0])))
        return tokens[len(prompt):]

    variants = {"incremental (subgraph 1 + state)": with_state, "full graph re-run per token": full_rerun}
    outputs = {name: run() for name, run in variants.items()}  # warm-up: compiles every shape once
    assert len(set(map(tuple, outputs.values()))) == 1, "the two ways gave different tokens"
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpu_rates: dict[str, list[float]] = {name: [] for name in variants}
    for round_number in range(args.rounds):
        for name, run in variants.items():
            load, started, cpu_started = load1(), time.perf_counter(), time.process_time()
            run()
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            rates[name].append(args.tokens / seconds)
            cpu_rates[name].append(args.tokens / cpu)
            emit({"bench": "generation_incremental", "variant": name, "round": round_number + 1,
                  "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "seconds": round(seconds, 3),
                  "cpu_seconds": round(cpu, 3), "tokens_per_s": round(args.tokens / seconds, 1),
                  "tokens_per_cpu_s": round(args.tokens / cpu, 1), "load": load})
    names = list(variants)
    emit({"bench": "generation_incremental", "prompt_tokens": args.prompt_tokens, "ratio_incremental_over_full": [
        round(a / b, 2) for a, b in zip(rates[names[0]], rates[names[1]], strict=True)],
        "cpu_ratio_incremental_over_full": [
        round(a / b, 2) for a, b in zip(cpu_rates[names[0]], cpu_rates[names[1]], strict=True)]})
    pipeline.close()


# ---- one decode step for a layout --------------------------------------------------------------------------------
def decode_steps(call, batch: int, steps: int, first_position: int, tokens: np.ndarray,
                 cpu: list[float] | None = None) -> list[float]:
    """`steps` timed calls of one token per row; returns seconds per call (and this process's CPU seconds per
    call in `cpu`: on a shared machine the CPU time of an in-process call is far steadier than its wall time)."""
    times = []
    positions = np.full(batch, first_position, np.int32)
    for _ in range(steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        logits = call(tokens, positions)
        times.append(time.perf_counter() - started)
        if cpu is not None:
            cpu.append(time.process_time() - cpu_started)
        tokens = np.argmax(logits, -1).astype(np.int32).reshape(batch, 1)
        positions = positions + 1
    return times


def step(args: argparse.Namespace, root: Path) -> None:
    reference = Reference()
    pipeline = direct.open_pipeline(exported(root, args.rank_size, args.stage_size))
    prompt = prompt_tokens(reference, args.prompt_tokens)
    batches = [int(b) for b in args.batch.split(",")]
    next_sequence = 0
    try:
        for round_number in range(args.rounds):
            for batch in batches:
                rows = list(range(next_sequence, next_sequence + batch))
                next_sequence += batch
                tokens = np.asarray([prompt] * batch, np.int32)
                (logits,) = pipeline.call(0, rows, [tokens, np.zeros(batch, np.int32)])
                last = np.argmax(logits, -1).astype(np.int32).reshape(batch, 1)

                def call(tokens, positions, rows=rows):
                    return pipeline.call(1, rows, [tokens, positions])[0]

                decode_steps(call, batch, 3, len(prompt), last)  # warm-up (first call at a shape compiles)
                load, cpu = load1(), []
                times = decode_steps(call, batch, args.steps, len(prompt) + 3, last, cpu)
                pipeline.release(rows)
                p50 = statistics.median(times)
                row = {"bench": "generation_decode_step", "rank_size": args.rank_size,
                       "stage_size": args.stage_size, "batch": batch, "round": round_number + 1, "steps": args.steps,
                       "p50_ms": round(p50 * 1e3, 3), "p90_ms": round(np.percentile(times, 90) * 1e3, 3),
                       "tokens_per_s": round(batch / p50, 1), "load": load}
                if isinstance(pipeline, direct.LocalPipeline):  # the ranks' CPU is this process's
                    row["cpu_p50_ms"] = round(statistics.median(cpu) * 1e3, 3)
                emit(row)
    finally:
        pipeline.close()


# ---- explicit state tensors vs in-graph state ------------------------------------------------------------------
def in_graph_model(root: Path, slots: int) -> ShardModel:
    ms = import_mindspore()
    config, weights = load_config(), load_weights()
    cell = build_stage_cell(weights, config, 0, 1, 0, 1, incremental=True, in_graph_slots=slots)
    path = root / f"in_graph_{slots}"
    if not path.with_suffix(".mindir").is_file():
        ms.export(cell, ms.Tensor(shape=[None, 1], dtype=ms.int32), ms.Tensor(shape=[None], dtype=ms.int32),
                  ms.Tensor(shape=[None], dtype=ms.int32), file_name=str(path), file_format="MINDIR")
    return ShardModel.load(path.with_suffix(".mindir"))


def state(args: argparse.Namespace, root: Path) -> None:
    reference = Reference()
    batches = [int(b) for b in args.batch.split(",")]
    slots = max(batches)
    runner = direct.RankRunner(exported(root, 1, 1) / "device0")
    in_graph = in_graph_model(root, slots)
    prompt = prompt_tokens(reference, args.prompt_tokens)

    # the same logits both ways: the prompt fed token by token into sequence 0 / slot 0
    for position, token in enumerate(prompt):
        inputs = [np.asarray([[token]], np.int32), np.asarray([position], np.int32)]
        (explicit_logits,) = runner.call(1, [10**6], inputs)
        (graph_logits,) = in_graph.run([*inputs, np.zeros(1, np.int32)])
    runner.release([10**6])
    difference = float(np.abs(explicit_logits - graph_logits).max())
    assert difference < 1e-4, f"in-graph state gives other logits ({difference})"

    def explicit_call(rows: list[int]):
        return lambda tokens, positions: runner.call(1, rows, [tokens, positions])[0]

    def graph_call(batch: int):
        row_slots = np.arange(batch, dtype=np.int32)
        return lambda tokens, positions: in_graph.run([tokens, positions, row_slots])[0]

    first = np.asarray([[prompt[-1]]], np.int32)
    results: dict[tuple[str, int], list[float]] = {}
    cpu_results: dict[tuple[str, int], list[float]] = {}
    for round_number in range(args.rounds):
        for batch in batches:
            tokens = np.repeat(first, batch, 0)
            variants: dict[str, Any] = {"explicit state (contract)": explicit_call(list(range(batch))),
                                        "in-graph Parameter + ScatterNdUpdate": graph_call(batch)}
            for name, call in variants.items():
                decode_steps(call, batch, 3, len(prompt), tokens)
                load, cpu = load1(), []
                times = decode_steps(call, batch, args.steps, len(prompt) + 3, tokens, cpu)
                p50, cpu_p50 = statistics.median(times), statistics.median(cpu)
                results.setdefault((name, batch), []).append(p50)
                cpu_results.setdefault((name, batch), []).append(cpu_p50)
                emit({"bench": "generation_state", "variant": name, "batch": batch, "round": round_number + 1,
                      "steps": args.steps, "p50_ms": round(p50 * 1e3, 3), "cpu_p50_ms": round(cpu_p50 * 1e3, 3),
                      "load": load})
            runner.release(list(range(batch)))
    for batch in batches:
        explicit = results[("explicit state (contract)", batch)]
        graph = results[("in-graph Parameter + ScatterNdUpdate", batch)]
        cpu_explicit = cpu_results[("explicit state (contract)", batch)]
        cpu_graph = cpu_results[("in-graph Parameter + ScatterNdUpdate", batch)]
        emit({"bench": "generation_state", "batch": batch, "ratio_explicit_over_in_graph": [
            round(a / b, 2) for a, b in zip(explicit, graph, strict=True)], "cpu_ratio_explicit_over_in_graph": [
            round(a / b, 2) for a, b in zip(cpu_explicit, cpu_graph, strict=True)],
            "max_logit_difference": difference})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["incremental", "step", "state"])
    parser.add_argument("--rank-size", type=int, default=1)
    parser.add_argument("--stage-size", type=int, default=1)
    parser.add_argument("--batch", default="1,16", help="sequences per decode step, comma-separated")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--export-dir", type=Path, default=None, help="reuse exports here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpt-bench-") as temp:
        root = args.export_dir or Path(temp)
        root.mkdir(parents=True, exist_ok=True)
        {"incremental": incremental, "step": step, "state": state}[args.mode](args, root)


if __name__ == "__main__":
    main()
