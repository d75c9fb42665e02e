"""Run the exported GPT shards with no service in between: the baseline the served model is checked and timed against.

Each rank keeps its attention state in numpy exactly as a zmserve agent does (generation-contract.md, section 1):
one array of the subgraph's state `shape` per sequence; a call stacks the rows' arrays along `batch_axis`, runs
the graph, and writes the `update` output (kv_new) of row b at time indices positions[b] .. positions[b]+T-1 of
that sequence's array. A sequence's state is freed when it is released.

Layouts with one rank per stage run every stage in this process. With tp > 1 every rank is a process of its own
(this module, `rank` mode): each stage forms its own MindSpore collective group around a scheduler
(zmserve.collective), and this process sends every rank of a stage the same inputs over a socket pair and takes
the stage's outputs from its first rank. Every wait has a deadline; every process is reaped.

    python direct.py --model-dir DIR/model --prompt "ROMEO." --max-tokens 30      # generate from an export
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from zmserve.collective import ShardModel, join_group, start_scheduler
from zmserve.export import GROUP_CONFIG_FILE
from zmserve.sampling import Sampler, SamplingParams
from zmserve.supervision import die_with_parent, reap
from zmserve.transport import free_port

STARTUP_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 120.0
LEAVE_DRAIN_S = 0.2
"""A rank that exits right after a collective can strand its peer: every rank waits this long before leaving."""


# ---- one rank: its subgraphs and its sequences' state -----------------------------------------------------------
class SequenceStates:
    """The state of every sequence one rank serves, for one stateful subgraph signature."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.shape = tuple(spec["shape"])
        self.dtype = np.dtype(spec["dtype"])
        self.batch_axis = spec["batch_axis"]
        self.time_axis = spec["time_axis"]
        self.arrays: dict[int, np.ndarray] = {}

    def stacked(self, sequences: Sequence[int]) -> np.ndarray:
        """The state input: each sequence's array (zeros for a new one) stacked along the batch axis."""
        rows = [self.arrays.setdefault(s, np.zeros(self.shape, self.dtype)) for s in sequences]
        return np.stack(rows, axis=self.batch_axis)

    def update(self, sequences: Sequence[int], update: np.ndarray, positions: np.ndarray) -> None:
        """Write row b of `update` at time indices positions[b] .. positions[b]+T-1 of sequence b's array."""
        time_axis = self.time_axis - (self.time_axis > self.batch_axis)  # the axis once the batch axis is gone
        length = update.shape[self.time_axis]
        for row, sequence in enumerate(sequences):
            start = int(positions[row])
            if not 0 <= start <= self.shape[time_axis] - length:
                raise ValueError(f"sequence {sequence}: positions {start}..{start + length - 1} do not fit "
                                 f"{self.shape[time_axis]}")
            target = [slice(None)] * len(self.shape)
            target[time_axis] = slice(start, start + length)
            self.arrays[sequence][tuple(target)] = np.take(update, row, axis=self.batch_axis)

    def release(self, sequences: Sequence[int]) -> None:
        for sequence in sequences:
            self.arrays.pop(sequence, None)


class RankRunner:
    """One rank's exported subgraphs (from its group_config.json), called with data values; state kept here."""

    def __init__(self, device_dir: Path) -> None:
        self.config = json.loads((device_dir / GROUP_CONFIG_FILE).read_text())
        self.subgraphs = self.config["subgraphs"]
        self.models = [ShardModel.load(device_dir / subgraph["file"]) for subgraph in self.subgraphs]
        self.states: dict[str, SequenceStates] = {}
        """By state name: the subgraphs that name one state (prefill and decode: "kv") share each sequence's array."""
        for subgraph in self.subgraphs:
            if "state" in subgraph:
                self.states.setdefault(subgraph["state"]["name"], SequenceStates(subgraph["state"]))

    def call(self, subgraph: int, sequences: Sequence[int], inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        signature = self.subgraphs[subgraph]
        if "state" not in signature:
            return self.models[subgraph].run(inputs)
        states = self.states[signature["state"]["name"]]
        *outputs, update = self.models[subgraph].run([*inputs, states.stacked(sequences)])
        names = [spec["name"] for spec in signature["inputs"]]
        states.update(sequences, update, inputs[names.index(signature["state"]["positions"])])
        return outputs

    def release(self, sequences: Sequence[int]) -> None:
        for states in self.states.values():
            states.release(sequences)


# ---- a whole model: its stages, here or in rank processes -----------------------------------------------------
class Pipeline(Protocol):
    def call(self, subgraph: int, sequences: Sequence[int], inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...
    def release(self, sequences: Sequence[int]) -> None: ...
    def close(self) -> None: ...


def device_dirs(model_dir: Path) -> list[Path]:
    """model_dir/device{0..R-1}, checked to be one whole export."""
    dirs = sorted((p for p in model_dir.glob("device*") if (p / GROUP_CONFIG_FILE).is_file()),
                  key=lambda p: int(p.name.removeprefix("device")))
    if not dirs:
        raise ValueError(f"no device*/{GROUP_CONFIG_FILE} under {model_dir}")
    rank_size = json.loads((dirs[0] / GROUP_CONFIG_FILE).read_text())["rank_size"]
    if [p.name for p in dirs] != [f"device{r}" for r in range(rank_size)]:
        raise ValueError(f"{model_dir} does not hold exactly ranks 0..{rank_size - 1}")
    return dirs


def open_pipeline(model_dir: Path) -> Pipeline:
    """All stages in this process when every stage is one rank, else one process per rank."""
    dirs = device_dirs(model_dir)
    config = json.loads((dirs[0] / GROUP_CONFIG_FILE).read_text())
    if config["rank_size"] == config["stage_size"]:
        return LocalPipeline([RankRunner(d) for d in dirs])
    return GroupPipeline(dirs, config["rank_size"] // config["stage_size"])


class LocalPipeline:
    """Stage after stage in this process (no collectives in any graph)."""

    def __init__(self, stages: list[RankRunner]) -> None:
        self.stages = stages

    def call(self, subgraph: int, sequences: Sequence[int], inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        values = list(inputs)
        for stage in self.stages:
            values = stage.call(subgraph, sequences, values)
        return values

    def release(self, sequences: Sequence[int]) -> None:
        for stage in self.stages:
            stage.release(sequences)

    def close(self) -> None:
        pass


@dataclass
class RankProcess:
    rank: int
    process: subprocess.Popen
    connection: Connection
    log: Path


@dataclass
class GroupPipeline:
    """One process per rank, one collective group (and scheduler) per stage; this process relays between stages."""

    dirs: list[Path]
    tp: int
    workdir: Path = field(default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")))
    schedulers: list[subprocess.Popen] = field(default_factory=list)
    ranks: list[RankProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        import tempfile

        self.workdir = Path(tempfile.mkdtemp(prefix="gpt-direct-", dir=self.workdir))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MS_")}
        env["GLOG_v"] = "3"
        try:
            for stage in range(len(self.dirs) // self.tp):
                port = free_port()
                with (self.workdir / f"scheduler{stage}.log").open("w") as log:
                    self.schedulers.append(start_scheduler("127.0.0.1", port, self.tp, env=env, stderr=log))
                for tp_rank in range(self.tp):
                    self.ranks.append(self._start_rank(stage * self.tp + tp_rank, port, tp_rank, env))
            for rank in self.ranks:
                self._receive(rank, STARTUP_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def _start_rank(self, rank: int, port: int, node_id: int, env: dict[str, str]) -> RankProcess:
        ours, theirs = socket.socketpair()
        log = self.workdir / f"rank{rank}.log"
        with ours, theirs, log.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, __file__, "rank", str(theirs.fileno()), str(self.dirs[rank]), str(port),
                 str(self.tp), str(node_id)],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                pass_fds=[theirs.fileno()], preexec_fn=die_with_parent)
            return RankProcess(rank, process, Connection(ours.detach()), log)

    def _receive(self, rank: RankProcess, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not rank.connection.poll(0.05):
            if rank.process.poll() is not None or time.monotonic() > deadline:
                what = f"exited with {rank.process.returncode}" if rank.process.poll() is not None else "timed out"
                tail = "\n".join(rank.log.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"rank {rank.rank} {what}:\n{tail}")
        status, value = rank.connection.recv()
        if status != "ok":
            raise RuntimeError(f"rank {rank.rank}: {value}")
        return value

    def _stage(self, stage: int, message: tuple) -> list[np.ndarray]:
        members = self.ranks[stage * self.tp:(stage + 1) * self.tp]
        for rank in members:
            rank.connection.send(message)
        results = [self._receive(rank, CALL_TIMEOUT_S) for rank in members]
        return results[0]

    def call(self, subgraph: int, sequences: Sequence[int], inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        values = list(inputs)
        for stage in range(len(self.dirs) // self.tp):
            values = self._stage(stage, ("call", subgraph, list(sequences), values))
        return values

    def release(self, sequences: Sequence[int]) -> None:
        for stage in range(len(self.dirs) // self.tp):
            self._stage(stage, ("release", list(sequences)))

    def close(self) -> None:
        for rank in self.ranks:
            with contextlib.suppress(OSError):
                rank.connection.send(("stop",))
        for rank in self.ranks:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rank.process.wait(5.0)
            reap(rank.process, timeout=2.0)
            rank.connection.close()
        for scheduler in self.schedulers:  # its members are gone: nothing left for it to do
            reap(scheduler, timeout=2.0)
        self.ranks, self.schedulers = [], []


def rank_main(fd: int, device_dir: str, port: int, group_size: int, node_id: int) -> None:
    """A rank process: join the stage's group, load the subgraphs, then serve calls until told to stop."""
    die_with_parent()
    connection = Connection(fd)
    code = 1
    try:
        join_group("127.0.0.1", port, group_size, node_id)
        runner = RankRunner(Path(device_dir))
        connection.send(("ok", None))
        while True:
            message = connection.recv()
            if message[0] == "stop":
                code = 0
                break
            try:
                if message[0] == "call":
                    connection.send(("ok", runner.call(*message[1:])))
                else:
                    runner.release(message[1])
                    connection.send(("ok", []))
            except Exception as exc:  # answered: the driver raises it with this rank's name
                connection.send(("error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"))
    except EOFError:
        pass
    finally:
        time.sleep(LEAVE_DRAIN_S)
        sys.stderr.flush()
        os._exit(code)


# ---- generation -------------------------------------------------------------------------------------------------
@dataclass
class Generation:
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-text came; not included) or "length" (max_tokens or max_len reached)
    logits: list[np.ndarray] = field(default_factory=list)
    """The logits each token was chosen from (kept when asked: tests compare them with the reference)."""


def generate(pipeline: Pipeline, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], eos: int,
             max_len: int, prefill_chunk: int | None = None, keep_logits: bool = False) -> list[Generation]:
    """Prefill each prompt (subgraph 0, in chunks of `prefill_chunk` tokens), then decode every unfinished sequence
    together, one token per row per step (subgraph 1). Same stopping rules as reference.Reference.generate."""
    samplers = [Sampler(p) for p in params]
    results = [Generation([], "length") for _ in prompts]
    lengths = [len(p) for p in prompts]
    last_logits: dict[int, np.ndarray] = {}
    for sequence, prompt in enumerate(prompts):
        if not 0 < len(prompt) <= max_len:
            raise ValueError(f"prompt {sequence} has {len(prompt)} tokens: 1 to {max_len} fit")
        chunk = prefill_chunk or len(prompt)
        for start in range(0, len(prompt), chunk):
            tokens = np.asarray([prompt[start:start + chunk]], dtype=np.int32)
            (logits,) = pipeline.call(0, [sequence], [tokens, np.asarray([start], dtype=np.int32)])
        last_logits[sequence] = logits[0]
    active = []
    for sequence in range(len(prompts)):
        if _choose(sequence, last_logits[sequence], samplers, results, params, lengths, eos, max_len, keep_logits):
            active.append(sequence)
        else:
            pipeline.release([sequence])
    while active:
        tokens = np.asarray([[results[s].token_ids[-1]] for s in active], dtype=np.int32)
        positions = np.asarray([lengths[s] - 1 for s in active], dtype=np.int32)
        (logits,) = pipeline.call(1, active, [tokens, positions])
        still = []
        for row, sequence in enumerate(active):
            if _choose(sequence, logits[row], samplers, results, params, lengths, eos, max_len, keep_logits):
                still.append(sequence)
        finished = [s for s in active if s not in still]
        if finished:
            pipeline.release(finished)
        active = still
    return results


def _choose(sequence: int, logits: np.ndarray, samplers: list[Sampler], results: list[Generation],
            params: Sequence[SamplingParams], lengths: list[int], eos: int, max_len: int, keep: bool) -> bool:
    """Pick sequence's next token; True while it goes on."""
    result = results[sequence]
    if len(result.token_ids) >= params[sequence].max_tokens or lengths[sequence] >= max_len:
        return False
    if keep:
        result.logits.append(np.array(logits))
    token = samplers[sequence].next_token(logits, result.token_ids)
    if token == eos:
        result.finish_reason = "stop"
        return False
    result.token_ids.append(token)
    lengths[sequence] += 1
    return len(result.token_ids) < params[sequence].max_tokens and lengths[sequence] < max_len


def main() -> None:
    if sys.argv[1:2] == ["rank"]:
        fd, device_dir, port, group_size, node_id = sys.argv[2:]
        rank_main(int(fd), device_dir, int(port), int(group_size), int(node_id))
        return
    from reference import Reference

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="the export's model/ folder")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--max-tokens", type=int, default=30)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    reference = Reference()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    pipeline = open_pipeline(args.model_dir)
    try:
        prompts = [reference.encode(p) for p in args.prompt]
        results = generate(pipeline, prompts, [params] * len(prompts), reference.eos,
                           reference.config["max_len"])
    finally:
        pipeline.close()
    for prompt, result in zip(args.prompt, results, strict=True):
        print(f"{prompt}{reference.decode(result.token_ids)}\n[{result.finish_reason}]")


if __name__ == "__main__":
    main()
