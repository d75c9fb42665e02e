"""Run an exported minilm model tree for real, stage after stage, without the serving plumbing.

A stage with tp > 1 runs as a real MindSpore CPU collective group: one scheduler process
(`zmserve.collective.start_scheduler`) plus one process per tensor-parallel rank, each joining with
`zmserve.collective.join_group`. A stage with tp == 1 is one plain process in no group (its graph holds no
collective). Every rank loads its MindIR as a `zmserve.collective.ShardModel` and runs every batch; the stage's
rank 0 saves the outputs (an .npz of .npy arrays), which become the next stage's inputs.

Every wait has a deadline, every process is reaped. Run as a script, this module is the rank process itself
(`rank ...`) or a MindIR inspector (`inspect ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from zmserve.collective import ShardModel, import_mindspore, join_group, start_scheduler
from zmserve.supervision import reap
from zmserve.transport import free_port

REPO = Path(__file__).resolve().parents[2]
WORLD_GROUP = "mccl_world_group"
STAGE_TIMEOUT_S = 120.0
GROUP_VARIABLES = ("MS_ROLE", "MS_SCHED_HOST", "MS_SCHED_PORT", "MS_WORKER_NUM", "MS_NODE_ID")


@dataclass
class RankReport:
    """What one rank process measured: group formation, MindIR load, and every call (first = compile)."""

    rank: int
    init_s: float
    load_s: float
    call_s: list[float]


@dataclass
class PipelineRun:
    outputs: list[list[np.ndarray]]
    """The last stage's outputs, one list per batch."""
    stage_outputs: list[list[list[np.ndarray]]] = field(default_factory=list)
    reports: list[RankReport] = field(default_factory=list)
    stage_seconds: list[float] = field(default_factory=list)


def save_batches(path: Path, batches: list[list[np.ndarray]]) -> None:
    """Write atomically: a reader never sees a half-written file."""
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **{f"b{i}_{j}": array for i, arrays in enumerate(batches) for j, array in enumerate(arrays)})
    os.replace(partial, path)


def load_batches(path: Path) -> list[list[np.ndarray]]:
    with np.load(path) as archive:
        keys = sorted((tuple(int(n) for n in key[1:].split("_")), key) for key in archive.files)
        batches: list[list[np.ndarray]] = []
        for (batch, _), key in keys:
            while len(batches) <= batch:
                batches.append([])
            batches[batch].append(archive[key])
    return batches


def base_environment() -> dict[str, str]:
    """This process's environment without any group variables, quiet MindSpore logging."""
    env = {k: v for k, v in os.environ.items() if k not in GROUP_VARIABLES}
    env["GLOG_v"] = "3"
    return env


def run_stage(model_files: list[Path], inputs: Path, outputs: Path, workdir: Path,
              timeout: float = STAGE_TIMEOUT_S) -> list[RankReport]:
    """Run one stage (its ranks' MindIRs, in tp-rank order) on `inputs`; its rank 0 writes `outputs`."""
    workdir.mkdir(parents=True, exist_ok=True)
    tp = len(model_files)
    processes: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}

    def log_file(name: str) -> IO[str]:
        logs[name] = workdir / f"{name}.log"
        return logs[name].open("w")

    options: dict[str, Any] = {"stderr": subprocess.STDOUT, "env": base_environment(), "cwd": REPO}
    try:
        port = free_port()
        if tp > 1:
            with log_file("scheduler") as log:
                processes["scheduler"] = start_scheduler("127.0.0.1", port, tp, stdout=log, **options)
        for tp_rank, model_file in enumerate(model_files):
            command = [sys.executable, __file__, "rank", "--rank", str(tp_rank), "--model", str(model_file),
                       "--inputs", str(inputs), "--report", str(workdir / f"rank{tp_rank}.json")]
            if tp_rank == 0:
                command += ["--outputs", str(outputs)]
            if tp > 1:
                command += ["--group-port", str(port), "--group-size", str(tp)]
            with log_file(f"rank{tp_rank}") as log:
                processes[f"rank{tp_rank}"] = subprocess.Popen(command, stdout=log, **options)
        wait_all(processes, logs, time.monotonic() + timeout)
        return [RankReport(**json.loads((workdir / f"rank{tp_rank}.json").read_text())) for tp_rank in range(tp)]
    finally:
        for process in processes.values():
            reap(process)


def wait_all(processes: dict[str, subprocess.Popen], logs: dict[str, Path], deadline: float) -> None:
    """Wait until every process exited 0; fail at once when one fails, or at the deadline."""
    pending = dict(processes)
    while pending:
        for name, process in list(pending.items()):
            try:
                code = process.wait(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                continue
            del pending[name]
            if code != 0:
                raise RuntimeError(f"{name} exited with {code}\n{log_tails(logs)}")
        if pending and time.monotonic() >= deadline:
            raise TimeoutError(f"still running at the deadline: {sorted(pending)}\n{log_tails(logs)}")


def log_tails(logs: dict[str, Path], lines: int = 20) -> str:
    parts = []
    for name, path in logs.items():
        text = [line for line in path.read_text(errors="replace").splitlines() if "[WARNING]" not in line]
        parts.append(f"--- {name} ---\n" + "\n".join(text[-lines:]))
    return "\n".join(parts)


def run_pipeline(model_dir: Path, rank_size: int, stage_size: int, batches: list[list[np.ndarray]],
                 workdir: Path, model_name: str = "minilm") -> PipelineRun:
    """Feed `batches` (stage-0 inputs) through every stage in turn; returns the last stage's outputs."""
    tp = rank_size // stage_size
    workdir.mkdir(parents=True, exist_ok=True)
    current = workdir / "stage0_inputs.npz"
    save_batches(current, batches)
    run = PipelineRun(outputs=[])
    for stage in range(stage_size):
        files = [model_dir / f"device{rank}" / f"{model_name}.mindir" for rank in range(stage * tp, (stage + 1) * tp)]
        produced = workdir / f"stage{stage}_outputs.npz"
        started = time.monotonic()
        run.reports += run_stage(files, current, produced, workdir / f"stage{stage}")
        run.stage_seconds.append(time.monotonic() - started)
        run.stage_outputs.append(load_batches(produced))
        current = produced
    run.outputs = run.stage_outputs[-1]
    return run


def inspect_mindirs(paths: list[Path]) -> dict[str, Any]:
    """Each MindIR's parameter dims and operator types, read in a subprocess (keeps MindSpore out of pytest)."""
    result = subprocess.run([sys.executable, __file__, "inspect", *map(str, paths)], capture_output=True,
                            text=True, check=True, env=base_environment(), cwd=REPO, timeout=STAGE_TIMEOUT_S)
    return json.loads(result.stdout.strip().splitlines()[-1])


def rank_main(args: argparse.Namespace) -> None:
    ms = import_mindspore()
    started = time.perf_counter()
    if args.group_port is not None:
        join_group("127.0.0.1", args.group_port, args.group_size, args.rank)
    init_s = time.perf_counter() - started
    started = time.perf_counter()
    shard = ShardModel.load(args.model)
    load_s = time.perf_counter() - started
    outputs, call_s = [], []
    for inputs in load_batches(Path(args.inputs)):
        started = time.perf_counter()
        arrays = shard.run(inputs)
        call_s.append(time.perf_counter() - started)
        outputs.append(arrays)
    if args.group_port is not None:
        # Leave together: a rank exiting right after its last collective can strand its peer.
        ms.ops.AllReduce(group=WORLD_GROUP)(ms.Tensor(np.ones(1, np.float32))).asnumpy()
    if args.outputs:
        save_batches(Path(args.outputs), outputs)
    Path(args.report).write_text(json.dumps({"rank": args.rank, "init_s": init_s, "load_s": load_s, "call_s": call_s}))


def inspect_main(args: argparse.Namespace) -> None:
    import mindspore as ms

    report = {}
    for path in args.paths:
        graph = ms.load_mindir(path).graph
        report[path] = {
            "parameters": {p.name.split(":")[-1]: list(p.dims) for p in graph.parameter},
            "ops": sorted({node.op_type.split("::")[-1].split(":")[0] for node in graph.node}),
        }
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    rank = commands.add_parser("rank", help="one rank: load its MindIR, run every input batch")
    rank.add_argument("--rank", type=int, required=True)
    rank.add_argument("--model", required=True)
    rank.add_argument("--inputs", required=True)
    rank.add_argument("--outputs")
    rank.add_argument("--report", required=True, help="where to write the timings (JSON)")
    rank.add_argument("--group-port", type=int, help="join the collective group around 127.0.0.1:PORT")
    rank.add_argument("--group-size", type=int, help="the group's member count (with --group-port)")
    inspect = commands.add_parser("inspect", help="print parameter dims and operator types of MindIR files")
    inspect.add_argument("paths", nargs="+")
    args = parser.parse_args()
    if args.command == "rank":
        rank_main(args)
    else:
        inspect_main(args)


if __name__ == "__main__":
    main()
