"""One model, two exports (e.g. before and after the lean exports of issue 23): the same inputs through each,
loaded as an agent loads a shard (`zmserve.collective.ShardModel`), alternating A and B for `--rounds` rounds in
one process, so the ratio holds on a busy machine. Also checks both answer the same (max abs difference).

    .venv/bin/python -m benchmarks.export_before_after --a old/minilm.mindir --b new/minilm.mindir \\
        --input int32:1x16:1 --input int32:1x16:1 --calls 200

`--input DTYPE:SHAPE:FILL` (FILL a number, or `random`), once per model input. Prints one JSON line per
(round, export) and a last line with the kernel counts (`zmserve.export.graph_kernels`) and the difference.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from zmserve.collective import ShardModel, import_mindspore  # noqa: E402
from zmserve.export import graph_kernels  # noqa: E402


def make_input(text: str, rng: np.random.Generator) -> np.ndarray:
    dtype, shape, fill = text.split(":")
    dims = tuple(int(d) for d in shape.split("x"))
    if fill == "random":
        return rng.standard_normal(dims).astype(dtype)
    return np.full(dims, float(fill)).astype(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, required=True)
    parser.add_argument("--b", type=Path, required=True)
    parser.add_argument("--input", action="append", required=True)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    import_mindspore()
    rng = np.random.default_rng(0)
    inputs = [make_input(text, rng) for text in args.input]
    models = {"a": ShardModel.load(args.a), "b": ShardModel.load(args.b)}
    outputs = {name: model.run(inputs) for name, model in models.items()}
    for round_ in range(args.rounds):
        for name, model in models.items():
            load = float(Path("/proc/loadavg").read_text().split()[0])
            samples = np.empty(args.calls)
            for i in range(args.calls):
                started = time.perf_counter()
                model.run(inputs)
                samples[i] = time.perf_counter() - started
            print(json.dumps({"tag": args.tag, "round": round_, "export": name, "load": load,
                              "p50_ms": round(float(np.percentile(samples, 50)) * 1e3, 3),
                              "p90_ms": round(float(np.percentile(samples, 90)) * 1e3, 3)}), flush=True)
    difference = max(float(np.abs(a - b).max()) for a, b in zip(outputs["a"], outputs["b"], strict=True))
    print(json.dumps({"tag": args.tag, "kernels_a": len(graph_kernels(args.a)), "kernels_b": len(graph_kernels(args.b)),
                      "max_abs_difference": difference}), flush=True)


if __name__ == "__main__":
    main()
