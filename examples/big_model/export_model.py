"""Export the big model (weights.py) sharded over `rank_size` ranks in `stage_size` pipeline stages, streamed.

One rank at a time, one tensor at a time: each tensor is generated from the seed, appended to the rank's
external data file and dropped (zmserve/streamed_export.py), so the export needs about the largest tensor in
memory (64 MB for the full preset), whatever the layout; even the unsharded layout (rank_size 1) is written
this way. Output, a complete servable folder:

    OUT/big/servable_config.py, OUT/big/layout.json         --servable-dir OUT --servable big
    OUT/model/device{r}/big.mindir (graph), big_variables/data_0 (weights), group_config.json

    python export_model.py --preset full --rank-size 8 --stage-size 2 --output-dir out/tp4pp2   # 4.4 GB

The input is x [batch, seq, hidden] with a dynamic batch. The sequence length is fixed (--seq 16) unless --seq 0
makes it dynamic too: an agent compiles its graph for each new input shape on the first call of that shape, and
MindSpore holds the GIL while it does (7 s for a 16-layer graph on this busy 2-core machine), so the agent's
heartbeats stop meanwhile. With a fixed length, one-instance calls have the shape the agents warm up with at
load time, and serving never compiles.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from model import build_stage_cell, export_tensor
from weights import PRESETS, Dims, check_layout, rank_nbytes, stage_layers, tensor

from zmserve.export import WORLD_GROUP, tensor_spec
from zmserve.streamed_export import compile_graph, export_rank_streamed, shard_bytes

HERE = Path(__file__).resolve().parent
MODEL_NAME = "big"
SERVABLE = "big"
DEFAULT_SEQ = 16


def hidden_spec(dims: Dims, seq: int, name: str) -> dict[str, Any]:
    return tensor_spec(name, (-1, seq or -1, dims.hidden))


def model_files(output_dir: Path, rank_size: int) -> list[Path]:
    return [output_dir / "model" / f"device{rank}" / f"{MODEL_NAME}.mindir" for rank in range(rank_size)]


class Progress:
    """One line per rank, and while a rank is written, its percentage (rewritten in place on a terminal)."""

    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self.done = 0
        self.started = time.perf_counter()
        self.live = sys.stdout.isatty()

    def tensor_written(self, _name: str, nbytes: int) -> None:
        self.done += nbytes
        if self.live:
            print(f"\r  {self.done / self.total:6.1%} of {self.total / 1e9:.2f} GB, "
                  f"{time.perf_counter() - self.started:.0f} s", end="", flush=True)

    def rank_written(self, line: str) -> None:
        print(("\r" if self.live else "") + line, flush=True)


def export(output_dir: Path, preset: str, rank_size: int, stage_size: int, seed: int = 0,
           seq: int = DEFAULT_SEQ) -> list[Path]:
    import mindspore as ms

    dims = PRESETS[preset]
    tp = check_layout(dims, rank_size, stage_size)
    progress = Progress(dims.nbytes())
    print(f"exporting preset {preset!r} ({dims.parameters() / 1e9:.2f} B parameters, {dims.nbytes() / 2**30:.2f} GiB"
          f" float32) as TP{tp}xPP{stage_size}, input [batch, {seq or 'any'}, {dims.hidden}], to {output_dir}",
          flush=True)
    example = [ms.Tensor(shape=[None, seq or None, dims.hidden], dtype=ms.float32)]
    paths = []
    for rank in range(rank_size):
        stage, tp_rank = divmod(rank, tp)
        layers = stage_layers(dims, stage, stage_size)
        group_config = {"rank_size": rank_size, "stage": stage, "stage_size": stage_size, "group": WORLD_GROUP,
                        "tp_size": tp, "tp_rank": tp_rank, "layers": [layers.start, layers.stop],
                        "preset": preset, "seed": seed,
                        "inputs": [hidden_spec(dims, seq, "x")], "outputs": [hidden_spec(dims, seq, "y")]}
        started = time.perf_counter()
        if tp_rank == 0:  # the tp ranks of a stage share one graph; only their weights differ
            cell, sources = build_stage_cell(dims, stage, stage_size, tp)
            graph = compile_graph(cell, example)

        def fill(name: str, _parameter: Any, sources: dict = sources, tp_rank: int = tp_rank) -> Any:
            layer, tensor_name = sources[name]
            return export_tensor(tensor(seed, dims, layer, tensor_name, tp_rank, tp), dims, tensor_name)

        path = export_rank_streamed(graph, output_dir / "model", rank, MODEL_NAME, group_config, fill,
                                    progress.tensor_written)
        expected = rank_nbytes(dims, rank_size, stage_size, rank)
        progress.rank_written(
            f"rank {rank + 1}/{rank_size} (stage {stage}, tp {tp_rank}/{tp}, layers {layers.start}-{layers.stop - 1})"
            f": {shard_bytes(path) / 1e6:.0f} MB on disk ({expected / 1e6:.0f} MB of weights) in "
            f"{time.perf_counter() - started:.1f} s; {progress.done / progress.total:.0%} done")
        paths.append(path)
    write_servable(output_dir, {"rank_size": rank_size, "stage_size": stage_size, "preset": preset, "seed": seed,
                                "seq": seq})
    seconds = time.perf_counter() - progress.started
    disk = sum(shard_bytes(path) for path in paths)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"done: {rank_size} ranks, {disk / 1e9:.2f} GB on disk in {seconds:.1f} s ({disk / 1e6 / seconds:.0f} MB/s), "
          f"peak RSS {peak:.0f} MiB; servable: --servable-dir {output_dir} --servable {SERVABLE}")
    return paths


def write_servable(output_dir: Path, layout: dict[str, Any]) -> None:
    folder = output_dir / SERVABLE
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / SERVABLE / "servable_config.py", folder / "servable_config.py")
    (folder / "layout.json").write_text(json.dumps(layout, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--rank-size", type=int, default=8)
    parser.add_argument("--stage-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq", type=int, default=DEFAULT_SEQ, help="tokens per input; 0 = any (dynamic)")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: out/tp<T>pp<S> next to this script")
    args = parser.parse_args()
    try:
        tp = check_layout(PRESETS[args.preset], args.rank_size, args.stage_size)
    except ValueError as error:
        parser.error(str(error))
    output_dir = args.output_dir or HERE / "out" / f"{args.preset}-tp{tp}pp{args.stage_size}"
    export(output_dir, args.preset, args.rank_size, args.stage_size, args.seed, args.seq)


if __name__ == "__main__":
    main()
