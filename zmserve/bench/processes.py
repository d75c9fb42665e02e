"""`zmserve bench run --processes N`: the clients spread over N OS processes, their records merged into this
process's one stream.

Why: in one process, every caller thread and the client's IO thread share one GIL, which caps the load one
bench process can offer; MindSpore Serving's own benchmark client uses one OS process per client. Each process
(a "part") is `zmserve bench run` itself, with its share of the concurrency (or of the rate) and of the
requests, and a hidden `--part I/N`: it numbers its requests I, I+N, I+2N, ... (ids stay unique, and request
lines are cycled as by one process), warms up, says ready on stdout and waits for a line on stdin, so all parts
start sending at once; it prints no summary and exits 0 whatever its requests got (the merged records are
judged here). A part that fails ends the run with its error.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from zmserve.bench.errors import BenchError
from zmserve.bench.load import LoadSpec, Target, share
from zmserve.bench.records import Record
from zmserve.bench.writer import ResultWriter
from zmserve.supervision import die_with_parent, reap

READY = {"ready": True}
"""A part's first line: warmed up, waiting for the go."""
GO = "go\n"
READY_POLL_S = 0.05
STDERR_TAIL_LINES = 8


def parse_part(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N): this process is part I of N."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise BenchError(f"--part {text!r} is not like 0/4")
    return int(index), int(count)


def announce_ready_and_wait() -> bool:
    """In a part: tell the parent we are ready; True once it says go (False if it went away)."""
    sys.stdout.write(json.dumps(READY) + "\n")
    sys.stdout.flush()
    return sys.stdin.readline() == GO


@dataclass
class Part:
    """One child process and what its stdout reader found."""

    index: int
    process: subprocess.Popen
    stderr: IO[str]
    ready: threading.Event = field(default_factory=threading.Event)
    records: int = 0
    bad_line: str | None = None

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        lines = [line.rstrip() for line in self.stderr.read().splitlines() if line.strip()]
        return "\n".join(lines[-STDERR_TAIL_LINES:])

    def failure(self) -> str | None:
        """Why this part failed, or None."""
        if self.bad_line is not None:
            return f"part {self.index} wrote a line that is not a record: {self.bad_line[:200]!r}"
        code = self.process.poll()
        if code not in (None, 0):
            return f"part {self.index} exited with {code}:\n{self.stderr_tail()}"
        return None


def run_in_processes(part_args: list[list[str]], writer: ResultWriter, startup_timeout: float) -> None:
    """Start one `zmserve bench run` per argument list, start them all sending at once, and pass their records
    on to `writer` as they come; returns when every part has exited."""
    parts: list[Part] = []
    readers: list[threading.Thread] = []
    with contextlib.ExitStack() as stack:
        try:
            for index, args in enumerate(part_args):
                stderr = stack.enter_context(tempfile.TemporaryFile("w+"))
                process = subprocess.Popen(
                    [sys.executable, "-m", "zmserve.cli", "bench", "run", *args], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=stderr, text=True, preexec_fn=die_with_parent,
                    env={**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")})
                parts.append(Part(index, process, stderr))
            for part in parts:
                reader = threading.Thread(target=_read_records, args=(part, writer), daemon=True,
                                          name=f"bench-part-{part.index}")
                reader.start()
                readers.append(reader)
            _wait_ready(parts, startup_timeout)
            for part in parts:
                assert part.process.stdin is not None
                with contextlib.suppress(BrokenPipeError):  # a part that died now is reported by its exit code
                    part.process.stdin.write(GO)
                    part.process.stdin.close()
            for part in parts:
                part.process.wait()
            for reader in readers:
                reader.join()
            failures = [why for part in parts if (why := part.failure())]
            if failures:
                raise BenchError(failures[0])
        finally:
            for part in parts:
                reap(part.process, timeout=5.0)


def _wait_ready(parts: list[Part], timeout: float) -> None:
    """Until every part has said ready; a part that exits first, or the deadline, fails the run."""
    deadline = time.monotonic() + timeout
    while waiting := [part for part in parts if not part.ready.is_set()]:
        for part in waiting:
            if part.process.poll() is not None:
                raise BenchError(part.failure() or f"part {part.index} exited before it was ready")
        if time.monotonic() > deadline:
            raise BenchError(f"parts {[part.index for part in waiting]} were not warmed up within {timeout:g} s "
                             f"(--startup-timeout)")
        waiting[0].ready.wait(READY_POLL_S)


def _read_records(part: Part, writer: ResultWriter) -> None:
    """A part's stdout: the ready line, then one record per line (read to the end, so a part never blocks on a
    full pipe)."""
    assert part.process.stdout is not None
    for line in part.process.stdout:
        if not line.strip() or part.bad_line is not None:
            continue
        if not part.ready.is_set() and line.strip() == json.dumps(READY):
            part.ready.set()
            continue
        try:
            record = Record.from_json(line)
        except ValueError:
            part.bad_line = line
            continue
        part.records += 1
        writer.sent += 1
        writer.put(record)


def part_arguments(target: Target, spec: LoadSpec, request_lines: list[str], parts: int,
                   workdir: Path, input_option: str = "--input") -> list[list[str]]:
    """The `zmserve bench run` arguments of each part: its share of the load, the requests as a file of request
    lines in `workdir` (given as `input_option`: `--input`, or `--prompts` in generation mode)."""
    if spec.rate is None and (spec.concurrency or parts) < parts:
        raise BenchError(f"-c {spec.concurrency} is fewer callers than --processes {parts}: each process needs at "
                         f"least one")
    if spec.requests is not None and spec.requests < parts:
        raise BenchError(f"--requests {spec.requests} is fewer than --processes {parts}")
    requests_file = workdir / "requests.jsonl"
    requests_file.write_text("".join(line.rstrip("\n") + "\n" for line in request_lines))
    common = ["--address", target.address, "--method", target.method, "--version", str(target.version),
              input_option, str(requests_file), "--timeout", repr(spec.timeout), "--warmup", str(spec.warmup)]
    if target.servable is not None:
        common += ["--servable", target.servable]
    if target.broker_key is not None and target.secret_key is not None:
        common += ["--broker-key", target.broker_key, "--secret-key", target.secret_key]
    if spec.duration is not None:
        common += ["--duration", repr(spec.duration)]
    arguments = []
    for index in range(parts):
        args = [*common, "--part", f"{index}/{parts}"]
        if spec.rate is not None:
            args += ["--rate", repr(spec.rate / parts)]
        else:
            args += ["-c", str(share(spec.concurrency or parts, parts, index))]
        if spec.requests is not None:
            args += ["--requests", str(share(spec.requests, parts, index))]
        if spec.seed is not None:
            args += ["--seed", str(spec.seed + index)]
        arguments.append(args)
    return arguments
