"""`zmserve bench run --direct`: the same calls on the bare MindIR shards, with no service in between (the floor
the service is measured against).

rank_size 1 runs the GraphCell in this process. rank_size > 1 runs a scheduler plus one process per rank (this
module is the rank process), the same calls on the same inputs in lock-step (the collectives inside each call
keep them there); rank 0 appends one record per call to a file this process follows. The model files must be
every rank of one single-stage model: a group with ranks missing would fail or measure something meaningless.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

import numpy as np

from zmserve.bench.errors import BenchError
from zmserve.bench.records import OK, Record
from zmserve.bench.requests import RequestSpec
from zmserve.bench.writer import ResultWriter
from zmserve.collective import ShardModel, join_group, start_scheduler
from zmserve.export import GROUP_CONFIG_FILE, read_group_config
from zmserve.protocol import ErrorCode
from zmserve.supervision import die_with_parent, reap
from zmserve.transport import free_port

LEAVE_DRAIN_S = 0.2
"""A rank that exits right after a collective can strand its peer: after the last recorded call each rank makes
one more (unrecorded) call and waits this long before leaving."""
POLL_INTERVAL_S = 0.02

CallFn = Callable[[list[np.ndarray]], list[np.ndarray]]
Inputs = list[list[list[np.ndarray]]]
"""Per request, per instance, the positional inputs."""


# ---- which files ------------------------------------------------------------------------------------------------
def whole_rank_set(model_files: list[str]) -> list[str]:
    """The model files in rank order, after checking (from each shard's group config) that they are every rank
    of one single-stage model. One file without a group config is a plain model of one rank."""
    for path in model_files:
        if not Path(path).is_file():
            raise BenchError(f"model file {path} does not exist")
    try:
        configs = [read_group_config(Path(path)) for path in model_files]
    except ValueError as exc:
        raise BenchError(f"--direct: {exc}") from None
    if len(model_files) == 1 and configs[0] is None:
        return model_files
    shards: dict[int, str] = {}
    rank_size = None
    for path, config in zip(model_files, configs, strict=True):
        if config is None:
            raise BenchError(f"--direct: no {GROUP_CONFIG_FILE} beside {path}, so its rank is unknown "
                             f"(zmserve's export writes one per shard)")
        rank, size, stages = config.get("rank"), config.get("rank_size"), config.get("stage_size", 1)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rank, size, stages)):
            raise BenchError(f"--direct: {GROUP_CONFIG_FILE} beside {path} lacks integer rank/rank_size/stage_size")
        if stages != 1:
            raise BenchError(f"--direct runs one tensor-parallel group; {path} is from a {stages}-stage pipeline "
                             f"(serve it to measure it)")
        if rank_size is not None and size != rank_size:
            raise BenchError(f"--direct: the model files come from different models ({shards[min(shards)]} is one "
                             f"of {rank_size} ranks, {path} one of {size})")
        rank_size = size
        if rank in shards:
            raise BenchError(f"--direct: rank {rank} given twice ({shards[rank]} and {path})")
        shards[rank] = path
    assert rank_size is not None
    missing = [rank for rank in range(rank_size) if rank not in shards]
    if missing:
        raise BenchError(f"--direct needs every rank of the model: got {_ranks(sorted(shards))} of rank_size "
                         f"{rank_size}, missing {_ranks(missing)}")
    return [shards[rank] for rank in range(rank_size)]


def _ranks(ranks: list[int]) -> str:
    """[0] -> 'rank 0', [2, 3, 4] -> 'ranks 2-4', [1, 3] -> 'ranks 1, 3'."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))


# ---- the calls ---------------------------------------------------------------------------------------------------
def timed_calls(call: CallFn, requests: Inputs, calls: int, warmup: int, emit: Callable[[Record], None],
                on_ready: Callable[[], None] | None = None) -> bool:
    """Run `warmup` then `calls` requests (each: its instances one after another) and emit a record per request.
    Returns False after the first failed call: in a collective group the other ranks cannot go on alone. A
    failed warm-up call is a BenchError (the inputs do not fit the model)."""
    for number in range(warmup):
        for instance in requests[number % len(requests)]:
            try:
                call(instance)
            except Exception as exc:
                raise BenchError(f"the warm-up call failed: {describe(exc)}") from None
    if on_ready is not None:
        on_ready()
    for number in range(calls):
        request = requests[number % len(requests)]
        bytes_out = sum(value.nbytes for instance in request for value in instance)
        send_time, started = time.time(), time.perf_counter()
        status, bytes_in, message = OK, 0, None
        try:
            for instance in request:
                bytes_in += sum(output.nbytes for output in call(instance))
        except Exception as exc:
            status, message = str(ErrorCode.INTERNAL), describe(exc)
        emit(Record.measured(number, send_time, time.perf_counter() - started, status, bytes_out, bytes_in,
                             message))
        if status != OK:
            return False
    return True


def describe(exc: BaseException) -> str:
    """`Type: first line` of an exception (MindSpore's messages go on with a C++ trace)."""
    if isinstance(exc, BenchError):
        return exc.message
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def run_direct_in_process(model_file: str, requests: list[RequestSpec], calls: int, warmup: int,
                          writer: ResultWriter) -> None:
    """rank_size 1: the GraphCell in this very process."""
    call = ShardModel.load(model_file).run

    def emit(record: Record) -> None:
        writer.sent = record.id + 1
        writer.put(record)

    timed_calls(call, [spec.positional() for spec in requests], calls, warmup, emit)


def run_direct_group(model_files: list[str], requests: list[RequestSpec], calls: int, warmup: int,
                     timeout: float, startup_timeout: float, writer: ResultWriter) -> None:
    """rank_size > 1: a scheduler plus one process per rank; rank 0's records are passed on as they come."""
    workdir = Path(tempfile.mkdtemp(prefix="zmserve-bench-"))
    scheduler: subprocess.Popen | None = None
    ranks: list[tuple[str, subprocess.Popen]] = []
    try:
        with contextlib.ExitStack() as logs:
            plan = write_plan(workdir, model_files, requests, calls, warmup)
            env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
            scheduler = start_scheduler(plan["scheduler_host"], plan["scheduler_port"], len(model_files), env=env,
                                        stderr=logs.enter_context((workdir / "scheduler.log").open("w")))
            for rank in range(len(model_files)):
                ranks.append((f"rank {rank}", subprocess.Popen(
                    [sys.executable, "-m", "zmserve.bench.direct", str(workdir / "plan.json"), str(rank)], env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=logs.enter_context((workdir / f"rank{rank}.log").open("w")), preexec_fn=die_with_parent)))
        follow_rank0(workdir, ranks, calls, timeout, startup_timeout, writer)
        leave_by = time.monotonic() + timeout
        for _, process in ranks:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, leave_by - time.monotonic()))
    finally:
        for _, process in ranks:
            reap(process, timeout=5.0)
        if scheduler is not None:
            reap(scheduler, timeout=1.0)
        shutil.rmtree(workdir, ignore_errors=True)


def write_plan(workdir: Path, model_files: list[str], requests: list[RequestSpec], calls: int,
               warmup: int) -> dict[str, Any]:
    """What every rank process needs, on disk: the group's scheduler, the inputs (one .npz, so every rank runs
    exactly the same data, random fills included) and how many calls to make."""
    arrays: dict[str, np.ndarray] = {}
    layout = []
    for r, spec in enumerate(requests):
        instances = []
        for i, instance in enumerate(spec.positional()):
            keys = [f"r{r}_i{i}_v{v}" for v in range(len(instance))]
            arrays.update(zip(keys, instance, strict=True))
            instances.append(keys)
        layout.append(instances)
    np.savez(workdir / "inputs.npz", **arrays)
    plan = {"scheduler_host": "127.0.0.1", "scheduler_port": free_port(),
            "model_files": [str(Path(p).resolve()) for p in model_files], "inputs": str(workdir / "inputs.npz"),
            "layout": layout, "calls": calls, "warmup": warmup, "results": str(workdir / "results.jsonl")}
    (workdir / "plan.json").write_text(json.dumps(plan))
    return plan


def follow_rank0(workdir: Path, ranks: list[tuple[str, subprocess.Popen]], calls: int, timeout: float,
                 startup_timeout: float, writer: ResultWriter) -> None:
    """Pass rank 0's records on as they appear. Deadlines: `startup_timeout` until the group is formed and warm,
    then `timeout` between two records; a rank that fails ends the run with its log."""
    results = workdir / "results.jsonl"
    deadline = time.monotonic() + startup_timeout
    ready, received, buffer = False, 0, ""
    with contextlib.ExitStack() as stack:
        handle: IO[str] | None = None
        while True:
            if handle is None and results.exists():
                handle = stack.enter_context(results.open())
            chunk = handle.read() if handle is not None else ""
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                message = json.loads(line)
                if message.get("ready"):
                    ready = True
                elif "error" in message:
                    raise BenchError(f"rank 0: {message['error']}\n{_log_tails(workdir, ranks)}")
                else:
                    record = Record.from_json(line)
                    writer.sent = record.id + 1
                    writer.put(record)
                    received += 1
                deadline = time.monotonic() + timeout
            if received >= calls:
                return
            failed = [(name, p.returncode) for name, p in ranks if p.poll() is not None and p.returncode != 0]
            if failed:
                raise BenchError(f"{failed[0][0]} exited with {failed[0][1]} after {received} of {calls} calls\n"
                                 f"{_log_tails(workdir, ranks)}")
            if all(p.poll() is not None for _, p in ranks) and not chunk:
                raise BenchError(f"the ranks exited after {received} of {calls} calls\n{_log_tails(workdir, ranks)}")
            if time.monotonic() > deadline:
                what = "the next call" if ready else f"the group to form and warm up ({startup_timeout:g} s)"
                raise BenchError(f"timed out waiting for {what} after {received} of {calls} calls\n"
                                 f"{_log_tails(workdir, ranks)}")
            if not chunk:
                time.sleep(POLL_INTERVAL_S)


def _log_tails(workdir: Path, ranks: list[tuple[str, subprocess.Popen]], lines: int = 8) -> str:
    parts = []
    for rank in range(len(ranks)):
        path = workdir / f"rank{rank}.log"
        text = [line for line in (path.read_text(errors="replace").splitlines() if path.exists() else [])
                if "WARNING" not in line][-lines:]
        parts.append(f"--- rank {rank} ---\n" + "\n".join(text))
    return "\n".join(parts)


def rank_process_main(argv: Sequence[str] | None = None) -> None:
    """One rank of a --direct group (started by `run_direct_group`): join, load, run the plan, leave."""
    die_with_parent()
    plan_path, rank_text = list(argv if argv is not None else sys.argv[1:])
    rank = int(rank_text)
    plan = json.loads(Path(plan_path).read_text())
    code = 1
    out: TextIO | None = open(plan["results"], "a") if rank == 0 else None  # noqa: SIM115

    def emit_line(text: str) -> None:
        if out is not None:
            out.write(text + "\n")
            out.flush()

    try:
        join_group(plan["scheduler_host"], plan["scheduler_port"], len(plan["model_files"]), rank)
        call = ShardModel.load(plan["model_files"][rank]).run
        with np.load(plan["inputs"], allow_pickle=False) as stored:
            requests = [[[stored[key] for key in keys] for keys in instances] for instances in plan["layout"]]
        if timed_calls(call, requests, plan["calls"], max(1, plan["warmup"]), lambda r: emit_line(r.to_json()),
                       on_ready=lambda: emit_line(json.dumps({"ready": True}))):
            call(requests[0][0])
            time.sleep(LEAVE_DRAIN_S)
            code = 0
    except Exception as exc:
        emit_line(json.dumps({"error": describe(exc)}))
        print(f"rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        if out is not None:
            out.close()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    rank_process_main()
