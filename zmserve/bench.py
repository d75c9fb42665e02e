"""`zmserve bench`: measure a servable (or its bare shards) and write one JSON line per request.

`zmserve bench run` sends requests through the broker like any client and writes
`{"id", "send_time", "latency_ms", "status", "bytes_out", "bytes_in"}` per request to stdout, so a run can be
piped, saved and summarised later with `zmserve bench report`; the summary of the run itself goes to stderr.
`--direct` runs the same calls on the MindIR shards with no service in between (the floor the service is
measured against). Load is either a closed loop (`-c N` callers, each waiting for its answer) or an open loop
(`--rate R`, Poisson arrivals sent on schedule whatever is still outstanding, so a slow server cannot slow the
offered load down, which a closed loop hides).

Latency runs from just before `Client.infer_async` to the moment the client resolves the request (stamped in
the client's IO thread, so closed and open loop measure the same span and a busy caller thread adds nothing).
`bytes_out`/`bytes_in` count tensor payload (the value frames), not headers. Latency percentiles are numpy's
default "linear" method (Hyndman-Fan type 7) over the requests that succeeded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

import click
import numpy as np

from zmserve.codec import ALLOWED_DTYPES, Instance
from zmserve.collective import ShardModel, join_group, start_scheduler
from zmserve.local import free_port
from zmserve.protocol import ErrorCode

OK = "OK"
DEFAULT_ADDRESS = "127.0.0.1:5500"
DEFAULT_REQUESTS = 100
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_STARTUP_TIMEOUT_S = 180.0
RESOLVE_GRACE_S = 5.0
"""How long past its own timeout a request may stay unanswered before the bench gives up on it (the client
expires requests itself; this bounds the wait even if it did not)."""
PROGRESS_INTERVAL_S = 1.0
LEAVE_DRAIN_S = 0.2
"""A rank that exits right after a collective can strand its peer: after the last recorded call each rank makes
one more (unrecorded) call and waits this long before leaving."""
POLL_INTERVAL_S = 0.02
PERCENTILES = (50, 90, 99)
FILLS = ("ones", "zeros", "random")
VALUE_KEYS = frozenset({"shape", "dtype", "fill", "npy"})
REQUEST_KEYS = frozenset({"servable", "method", "inputs", "instances"})
RECORD_FIELDS = ("id", "send_time", "latency_ms", "status", "bytes_out", "bytes_in")


class BenchError(click.ClickException):
    """A problem the user can fix (bad input line, bad flags, a group that did not form): shown without a trace."""


# ---- requests -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestSpec:
    """One request to send: where to, and its instances, built once up front so sending costs no numpy work."""

    servable: str | None
    method: str | None
    instances: list[Instance]

    @property
    def bytes_out(self) -> int:
        return payload_bytes(self.instances)


def payload_bytes(instances: Iterable[Mapping[str, Any]]) -> int:
    """Bytes of tensor payload (what travels in value frames)."""
    total = 0
    for instance in instances:
        for value in instance.values():
            if isinstance(value, np.ndarray):
                total += value.nbytes
            elif isinstance(value, str | bytes):
                total += len(value)
            else:
                total += np.asarray(value).nbytes
    return total


def parse_shape(text: str) -> list[int]:
    """`128x96` (or `128,96`) -> [128, 96]; an empty string is a scalar."""
    text = text.strip()
    if not text:
        return []
    parts = text.replace(",", "x").split("x")
    if not all(part.strip().isdigit() for part in parts):
        raise BenchError(f"shape {text!r} is not like 128x96")
    return [int(part) for part in parts]


def parse_fill(text: str) -> str | float:
    """`ones`, `zeros`, `random` or a number."""
    if text in FILLS:
        return text
    try:
        return float(text)
    except ValueError:
        raise BenchError(f"fill {text!r} is not one of {', '.join(FILLS)} or a number") from None


def make_array(shape: Sequence[int], dtype: str, fill: str | float, rng: np.random.Generator) -> np.ndarray:
    """A tensor of `shape`/`dtype` filled with ones, zeros, one number, or uniform random values."""
    if dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(sorted(ALLOWED_DTYPES))}")
    if fill == "ones":
        return np.ones(shape, dtype=dtype)
    if fill == "zeros":
        return np.zeros(shape, dtype=dtype)
    if fill == "random":
        kind = np.dtype(dtype).kind
        if kind == "f":
            return rng.uniform(-1.0, 1.0, shape).astype(dtype)
        if kind == "b":
            return rng.integers(0, 2, shape).astype(dtype)
        return rng.integers(0, 100, shape).astype(dtype)
    if isinstance(fill, bool) or not isinstance(fill, int | float):
        raise ValueError(f"fill {fill!r} is not one of {', '.join(FILLS)} or a number")
    return np.full(shape, fill, dtype=dtype)


def build_value(name: str, spec: Any, rng: np.random.Generator) -> np.ndarray:
    """One input from its JSON description: `{"shape", "dtype", "fill"}` or `{"npy": path}`."""
    if not isinstance(spec, dict):
        raise ValueError(f"input {name!r} must be an object like {{\"shape\": [128, 96], \"dtype\": \"float32\"}}")
    unknown = set(spec) - VALUE_KEYS
    if unknown:
        raise ValueError(f"input {name!r} has unknown keys {sorted(unknown)}; allowed: {sorted(VALUE_KEYS)}")
    if "npy" in spec:
        if len(spec) != 1:
            raise ValueError(f"input {name!r}: 'npy' cannot be combined with shape/dtype/fill")
        try:
            return np.load(spec["npy"], allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"input {name!r}: cannot load {spec['npy']!r}: {exc}") from None
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return make_array(shape, spec.get("dtype", "float32"), spec.get("fill", "ones"), rng)


def _json_object(line: str, what: str) -> dict[str, Any]:
    """Parse one JSON line that must be an object; ValueError says what is wrong."""
    try:
        document = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{what} must be a JSON object")
    return document


def parse_request(line: str, rng: np.random.Generator) -> RequestSpec:
    """One JSON request line -> RequestSpec; raises ValueError saying what is wrong."""
    document = _json_object(line, "a request line")
    unknown = set(document) - REQUEST_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; allowed: {sorted(REQUEST_KEYS)}")
    inputs = document.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise ValueError("'inputs' must be a non-empty object of name -> {shape, dtype, fill} or {npy}")
    count = document.get("instances", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"'instances' must be a positive integer, got {count!r}")
    for key in ("servable", "method"):
        if key in document and not isinstance(document[key], str):
            raise ValueError(f"'{key}' must be a string")
    instance = {name: build_value(name, spec, rng) for name, spec in inputs.items()}
    return RequestSpec(document.get("servable"), document.get("method"), [instance] * count)


def read_requests(lines: Iterable[str], source: str, seed: int | None = None) -> list[RequestSpec]:
    """Every request of a JSON-lines stream (blank lines skipped); a bad line fails with `source:line: why`."""
    rng = np.random.default_rng(seed)
    requests = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            requests.append(parse_request(line, rng))
        except ValueError as exc:
            raise BenchError(f"{source}:{number}: {exc}") from None
    if not requests:
        raise BenchError(f"{source}: no requests (expected one JSON object per line)")
    return requests


# ---- records and their summary --------------------------------------------------------------------------------
def make_record(request_id: int, send_time: float, latency_s: float, status: str, bytes_out: int,
                bytes_in: int) -> dict[str, Any]:
    return {"id": request_id, "send_time": round(send_time, 6), "latency_ms": round(latency_s * 1000.0, 4),
            "status": status, "bytes_out": bytes_out, "bytes_in": bytes_in}


def parse_record(line: str) -> dict[str, Any]:
    """One result line -> record; raises ValueError if it is not one."""
    record = _json_object(line, "a result line")
    for key in ("send_time", "latency_ms"):
        if not isinstance(record.get(key), int | float) or isinstance(record.get(key), bool):
            raise ValueError(f"'{key}' must be a number, got {record.get(key)!r}")
    if not isinstance(record.get("status"), str):
        raise ValueError(f"'status' must be a string, got {record.get('status')!r}")
    record.setdefault("bytes_out", 0)
    record.setdefault("bytes_in", 0)
    return record


def read_records(lines: Iterable[str], source: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(parse_record(line))
        except ValueError as exc:
            raise BenchError(f"{source}:{number}: {exc}") from None
    return records


@dataclass(frozen=True)
class Summary:
    """What a run amounts to. Duration runs from the first send to the last answer; throughput counts every
    answered request over it; send rate is (n - 1) / (last send - first send), the offered load actually
    achieved; latency percentiles cover successful requests only."""

    requests: int
    ok: int
    errors: dict[str, int]
    duration_s: float
    throughput_rps: float
    ok_throughput_rps: float
    send_rate_rps: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    bytes_out: int = 0
    bytes_in: int = 0


def percentiles(values: Sequence[float], points: Sequence[float] = PERCENTILES) -> dict[str, float]:
    """`p50`, `p90`, ... with numpy's linear interpolation, plus `max` and `mean`; empty -> {}."""
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    result = {f"p{p:g}": float(v) for p, v in zip(points, np.percentile(array, points, method="linear"),
                                                  strict=True)}
    result["max"] = float(array.max())
    result["mean"] = float(array.mean())
    return result


def summarize(records: Sequence[Mapping[str, Any]]) -> Summary:
    """The summary of result records (pure: no clock, no IO)."""
    if not records:
        return Summary(0, 0, {}, 0.0, 0.0, 0.0, 0.0)
    sends = np.array([r["send_time"] for r in records], dtype=np.float64)
    ends = sends + np.array([r["latency_ms"] for r in records], dtype=np.float64) / 1000.0
    statuses = Counter(r["status"] for r in records)
    ok_latencies = [float(r["latency_ms"]) for r in records if r["status"] == OK]
    duration = float(ends.max() - sends.min())
    send_span = float(sends.max() - sends.min())
    count = len(records)
    return Summary(
        requests=count,
        ok=statuses.get(OK, 0),
        errors={code: n for code, n in sorted(statuses.items()) if code != OK},
        duration_s=duration,
        throughput_rps=count / duration if duration > 0 else 0.0,
        ok_throughput_rps=statuses.get(OK, 0) / duration if duration > 0 else 0.0,
        send_rate_rps=(count - 1) / send_span if send_span > 0 else 0.0,
        latency_ms=percentiles(ok_latencies),
        bytes_out=sum(int(r.get("bytes_out", 0)) for r in records),
        bytes_in=sum(int(r.get("bytes_in", 0)) for r in records),
    )


def format_summary(summary: Summary) -> str:
    """The summary as a small table for people."""
    errors = ", ".join(f"{code} {n}" for code, n in summary.errors.items()) or "none"
    if summary.latency_ms:
        latency = "  ".join(f"{key} {summary.latency_ms[key]:.3f}" for key in (*(f"p{p}" for p in PERCENTILES),
                                                                                "max"))
    else:
        latency = "- (no successful requests)"
    rows = [
        ("requests", f"{summary.requests} (OK {summary.ok})"),
        ("errors", errors),
        ("duration", f"{summary.duration_s:.3f} s"),
        ("send rate", f"{summary.send_rate_rps:.1f} req/s"),
        ("throughput", f"{summary.throughput_rps:.1f} req/s (OK {summary.ok_throughput_rps:.1f} req/s)"),
        ("latency ms", latency),
        ("payload", f"{summary.bytes_out / 1e6:.2f} MB out, {summary.bytes_in / 1e6:.2f} MB in"),
    ]
    return "\n".join(f"{name:<11} {value}" for name, value in rows)


# ---- writing results ------------------------------------------------------------------------------------------
class ResultWriter(threading.Thread):
    """Owns stdout and the progress line: producers `put` records from any thread (including the client's IO
    thread), so answering a request never waits on a pipe."""

    def __init__(self, out: TextIO, err: TextIO, progress: bool) -> None:
        super().__init__(name="bench-writer", daemon=True)
        self.out, self.err, self.progress = out, err, progress
        self.records: list[dict[str, Any]] = []
        self.sent = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._out_open = True
        self._started_at = time.monotonic()

    def put(self, record: dict[str, Any]) -> None:
        self._queue.put(record)

    def finish(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        self._queue.put(None)
        self.join(timeout)
        return self.records

    def run(self) -> None:
        next_progress = time.monotonic() + PROGRESS_INTERVAL_S
        while True:
            try:
                record = self._queue.get(timeout=PROGRESS_INTERVAL_S / 4)
            except queue.Empty:
                record = {}
            if record is None:
                break
            if record:
                self.records.append(record)
                self._write(json.dumps(record) + "\n")
            if self.progress and time.monotonic() >= next_progress:
                next_progress = time.monotonic() + PROGRESS_INTERVAL_S
                self._show_progress()
        if self._out_open:
            with contextlib.suppress(BrokenPipeError, ValueError):
                self.out.flush()
        if self.progress:
            self.err.write("\n")
            self.err.flush()

    def _write(self, text: str) -> None:
        if not self._out_open:
            return
        try:
            self.out.write(text)
        except (BrokenPipeError, ValueError):
            self._out_open = False

    def _show_progress(self) -> None:
        done = len(self.records)
        errors = sum(1 for r in self.records if r["status"] != OK)
        elapsed = max(time.monotonic() - self._started_at, 1e-9)
        recent = [r["latency_ms"] for r in self.records[-200:] if r["status"] == OK]
        p50 = f"{float(np.median(recent)):.2f} ms" if recent else "-"
        self.err.write(f"\rsent {self.sent}  done {done}  errors {errors}  {done / elapsed:.1f} req/s  "
                       f"p50(last 200) {p50}   ")
        self.err.flush()


# ---- load against the service ---------------------------------------------------------------------------------
class Tickets:
    """Hands out request numbers until the request count or the duration is used up, or someone cancels."""

    def __init__(self, requests: int | None, duration: float | None) -> None:
        self.requests = requests
        self.duration = duration
        self.started = time.monotonic()
        self.issued = 0
        self.cancelled = threading.Event()
        self._lock = threading.Lock()

    def take(self, at: float | None = None) -> int | None:
        """The next request number, or None when the run is over (`at`: the monotonic time it would go out)."""
        with self._lock:
            if self.cancelled.is_set() or (self.requests is not None and self.issued >= self.requests):
                return None
            when = time.monotonic() if at is None else at
            if self.duration is not None and when - self.started >= self.duration:
                return None
            number = self.issued
            self.issued += 1
            return number


class ServiceLoad:
    """Sends requests to the broker through one `Client` per (servable, method)."""

    def __init__(self, address: str, servable: str | None, method: str, version: int,
                 requests: list[RequestSpec], timeout: float, writer: ResultWriter) -> None:
        from zmserve.client import Client

        self.timeout = timeout
        self.writer = writer
        self.requests = requests
        self.clients: dict[tuple[str, str], Any] = {}
        self.targets: list[tuple[str, str]] = []
        for number, spec in enumerate(requests, start=1):
            target = (spec.servable or servable, spec.method or method)
            if target[0] is None:
                raise BenchError(f"request {number} names no servable: give --servable or \"servable\" in the line")
            self.targets.append(target)
        for target in dict.fromkeys(self.targets):
            self.clients[target] = Client(address, target[0], target[1], version)
        self._outstanding: dict[int, tuple[Future, float, float, RequestSpec]] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def spec(self, number: int) -> tuple[Any, RequestSpec]:
        index = number % len(self.requests)
        return self.clients[self.targets[index]], self.requests[index]

    def warm_up(self, count: int) -> None:
        """Unrecorded requests first, so the first recorded ones do not pay for connecting."""
        for number in range(count):
            client, spec = self.spec(number)
            future = client.infer_async(spec.instances, self.timeout)
            with contextlib.suppress(Exception):
                future.result(self.timeout + RESOLVE_GRACE_S)

    def closed_loop(self, tickets: Tickets, concurrency: int) -> None:
        """`concurrency` callers, each sending its next request when the previous one is answered."""
        threads = [threading.Thread(target=self._caller, args=(tickets,), name=f"bench-caller-{i}", daemon=True)
                   for i in range(concurrency)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.1)
        finally:
            tickets.cancelled.set()
            deadline = time.monotonic() + self.timeout + 2 * RESOLVE_GRACE_S
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

    def _caller(self, tickets: Tickets) -> None:
        while (number := tickets.take()) is not None:
            self.writer.sent = tickets.issued
            client, spec = self.spec(number)
            answered = threading.Event()
            finished = [0.0]

            def stamp(_: Future, finished: list[float] = finished, answered: threading.Event = answered) -> None:
                finished[0] = time.perf_counter()
                answered.set()

            send_time, started = time.time(), time.perf_counter()
            future = client.infer_async(spec.instances, self.timeout)
            future.add_done_callback(stamp)
            if answered.wait(self.timeout + RESOLVE_GRACE_S):
                exc = future.exception()
                status, bytes_in = (OK, payload_bytes(future.result())) if exc is None else (_status_of(exc), 0)
            else:
                status, bytes_in, finished[0] = str(ErrorCode.DEADLINE_EXCEEDED), 0, time.perf_counter()
            self.writer.put(make_record(number, send_time, finished[0] - started, status, spec.bytes_out, bytes_in))

    def open_loop(self, tickets: Tickets, rate: float, seed: int | None) -> None:
        """Poisson arrivals at `rate`: each request goes out at its scheduled time, answered or not; the schedule
        is absolute, so a late wake-up is made up by the next sends instead of lowering the rate."""
        rng = np.random.default_rng(seed)
        next_at = time.monotonic()
        try:
            while (number := tickets.take(at=next_at)) is not None:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self._send_async(number)
                self.writer.sent = tickets.issued
                next_at += rng.exponential(1.0 / rate)
        finally:
            tickets.cancelled.set()
            self._wait_outstanding(time.monotonic() + self.timeout + RESOLVE_GRACE_S)

    def _send_async(self, number: int) -> None:
        client, spec = self.spec(number)
        send_time, started = time.time(), time.perf_counter()
        with self._lock:
            future = client.infer_async(spec.instances, self.timeout)
            self._outstanding[number] = (future, send_time, started, spec)
        future.add_done_callback(lambda f, n=number: self._answered(n, f))

    def _answered(self, number: int, future: Future) -> None:
        finished = time.perf_counter()
        with self._lock:
            entry = self._outstanding.pop(number, None)
            if not self._outstanding:
                self._idle.notify_all()
        if entry is None:
            return
        _, send_time, started, spec = entry
        exc = future.exception()
        status, bytes_in = (OK, payload_bytes(future.result())) if exc is None else (_status_of(exc), 0)
        self.writer.put(make_record(number, send_time, finished - started, status, spec.bytes_out, bytes_in))

    def _wait_outstanding(self, deadline: float) -> None:
        with self._lock:
            while self._outstanding and time.monotonic() < deadline:
                self._idle.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            late, self._outstanding = self._outstanding, {}
        now = time.perf_counter()
        for number, (_, send_time, started, spec) in sorted(late.items()):
            self.writer.put(make_record(number, send_time, now - started, str(ErrorCode.DEADLINE_EXCEEDED),
                                        spec.bytes_out, 0))


def _status_of(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return str(code) if code else type(exc).__name__


# ---- direct: the shards without the service --------------------------------------------------------------------
CallFn = Callable[[list[np.ndarray]], list[np.ndarray]]


def timed_calls(call: CallFn, requests: Sequence[Sequence[list[np.ndarray]]], calls: int, warmup: int,
                emit: Callable[[dict[str, Any]], None], on_ready: Callable[[], None] | None = None) -> bool:
    """Run `warmup` then `calls` requests (each: its instances one after another) and emit a record per request.
    Returns False after the first failed call: in a collective group the other ranks cannot go on alone."""
    for number in range(warmup):
        for instance in requests[number % len(requests)]:
            call(instance)
    if on_ready is not None:
        on_ready()
    for number in range(calls):
        request = requests[number % len(requests)]
        bytes_out = sum(value.nbytes for instance in request for value in instance)
        send_time, started = time.time(), time.perf_counter()
        status, bytes_in = OK, 0
        try:
            for instance in request:
                bytes_in += sum(output.nbytes for output in call(instance))
        except Exception as exc:
            status = str(ErrorCode.INTERNAL)
            print(f"call {number} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        emit(make_record(number, send_time, time.perf_counter() - started, status, bytes_out, bytes_in))
        if status != OK:
            return False
    return True


def positional(requests: Sequence[RequestSpec]) -> list[list[list[np.ndarray]]]:
    """Requests as lists of positional inputs (a GraphCell takes its inputs in order, not by name)."""
    return [[[np.asarray(v) for v in instance.values()] for instance in spec.instances] for spec in requests]


def run_direct_in_process(model_file: str, requests: list[RequestSpec], calls: int, warmup: int,
                          writer: ResultWriter) -> None:
    """rank_size 1: the GraphCell in this very process."""
    if not Path(model_file).is_file():
        raise BenchError(f"model file {model_file} does not exist")
    call = ShardModel.load(model_file).run

    def emit(record: dict[str, Any]) -> None:
        writer.sent = record["id"] + 1
        writer.put(record)

    timed_calls(call, positional(requests), calls, warmup, emit)


def run_direct_group(model_files: list[str], requests: list[RequestSpec], calls: int, warmup: int,
                     timeout: float, startup_timeout: float, writer: ResultWriter) -> None:
    """rank_size > 1: a scheduler plus one process per rank, the same calls on the same inputs in lock-step (the
    AllReduce inside each call keeps them there); rank 0 appends one record per call to a file read here."""
    from zmserve.supervision import die_with_parent, reap

    for path in model_files:
        if not Path(path).is_file():
            raise BenchError(f"model file {path} does not exist")
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
                    [sys.executable, "-c", "from zmserve.bench import rank_process_main; rank_process_main()",
                     str(workdir / "plan.json"), str(rank)], env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=logs.enter_context((workdir / f"rank{rank}.log").open("w")),
                    preexec_fn=die_with_parent)))
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
    for r, request in enumerate(positional(requests)):
        instances = []
        for i, instance in enumerate(request):
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
                    writer.sent = message["id"] + 1
                    writer.put(message)
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
    from zmserve.supervision import die_with_parent

    die_with_parent()
    plan_path, rank_text = list(argv if argv is not None else sys.argv[1:])
    rank = int(rank_text)
    plan = json.loads(Path(plan_path).read_text())
    code = 1
    out: TextIO | None = open(plan["results"], "a") if rank == 0 else None  # noqa: SIM115

    def emit(message: dict[str, Any]) -> None:
        if out is not None:
            out.write(json.dumps(message) + "\n")
            out.flush()

    try:
        join_group(plan["scheduler_host"], plan["scheduler_port"], len(plan["model_files"]), rank)
        call = ShardModel.load(plan["model_files"][rank]).run
        with np.load(plan["inputs"], allow_pickle=False) as stored:
            requests = [[[stored[key] for key in keys] for keys in instances] for instances in plan["layout"]]
        if timed_calls(call, requests, plan["calls"], max(1, plan["warmup"]), emit,
                       on_ready=lambda: emit({"ready": True})):
            call(requests[0][0])
            time.sleep(LEAVE_DRAIN_S)
            code = 0
    except Exception as exc:
        emit({"error": f"{type(exc).__name__}: {exc}"})
        print(f"rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        if out is not None:
            out.close()
        sys.stderr.flush()
        os._exit(code)


# ---- the command line -----------------------------------------------------------------------------------------
class DefaultRunGroup(click.Group):
    """`zmserve bench [OPTIONS]` is `zmserve bench run [OPTIONS]`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultRunGroup)
def bench() -> None:
    """Measure a servable: `run` writes one JSON line per request, `report` summarises such lines.
    Without a subcommand, `zmserve bench [OPTIONS]` means `zmserve bench run [OPTIONS]`."""


def _split(values: tuple[str, ...]) -> list[str]:
    return [part for value in values for part in value.split(",") if part]


def _open_lines(source: str) -> Iterator[str]:
    if source == "-":
        yield from sys.stdin
        return
    try:
        with open(source) as handle:
            yield from handle
    except OSError as exc:
        raise BenchError(f"cannot read {source}: {exc}") from None


def resolve_requests(input_path: str | None, input_name: str, shape: str | None, dtype: str, fill: str,
                     count: int, seed: int | None) -> tuple[list[RequestSpec], bool]:
    """The requests to cycle through, and whether they came from lines (then each line is one request)."""
    if input_path is None and shape is None:
        if sys.stdin.isatty():
            raise BenchError("no requests: give --shape (with --input-name/--dtype/--fill) or pipe JSON lines "
                             "on stdin (--input -)")
        input_path = "-"
    if input_path is not None:
        if shape is not None:
            raise BenchError("give either --shape or --input, not both")
        return read_requests(_open_lines(input_path), "stdin" if input_path == "-" else input_path, seed), True
    try:
        array = make_array(parse_shape(shape or ""), dtype, parse_fill(fill), np.random.default_rng(seed))
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    return [RequestSpec(None, None, [{input_name: array}] * count)], False


@bench.command()
@click.option("--address", default=DEFAULT_ADDRESS, show_default=True, help="the broker's client address")
@click.option("--servable", default=None, help="servable to call (a request line's \"servable\" wins)")
@click.option("--method", default="predict", show_default=True, help="method to call (a line's \"method\" wins)")
@click.option("--version", "version_number", default=0, show_default=True, type=click.IntRange(min=0),
              help="servable version; 0 = newest")
@click.option("--input", "input_path", default=None,
              help="JSON-lines request file, '-' for stdin (the default when stdin is piped and no --shape)")
@click.option("--input-name", default="x", show_default=True)
@click.option("--shape", default=None, help="generate requests: input shape like 128x96")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(sorted(ALLOWED_DTYPES)))
@click.option("--fill", default="ones", show_default=True, help="ones | zeros | random | a number")
@click.option("--count", default=1, show_default=True, type=click.IntRange(min=1), help="instances per request")
@click.option("-c", "--concurrency", default=None, type=click.IntRange(min=1),
              help="closed loop: this many callers, each waiting for its answer (default 1)")
@click.option("--rate", default=None, type=click.FloatRange(min=0, min_open=True),
              help="open loop: Poisson arrivals at this many requests/s")
@click.option("--requests", "request_count", default=None, type=click.IntRange(min=1),
              help=f"requests to send (default: each input line once, or {DEFAULT_REQUESTS})")
@click.option("--duration", default=None, type=click.FloatRange(min=0, min_open=True), help="seconds to send for")
@click.option("--timeout", default=DEFAULT_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="per request, seconds")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0),
              help="unrecorded requests sent first")
@click.option("--seed", default=None, type=int, help="seed for random fills and arrival times")
@click.option("--direct", is_flag=True, help="no service: run --model-files in-process (one process per rank)")
@click.option("--model-files", multiple=True, help="--direct: one MindIR per rank, in rank order (comma list)")
@click.option("--startup-timeout", default=DEFAULT_STARTUP_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="--direct: seconds for the group to form")
def run(address: str, servable: str | None, method: str, version_number: int, input_path: str | None,
        input_name: str, shape: str | None, dtype: str, fill: str, count: int, concurrency: int | None,
        rate: float | None, request_count: int | None, duration: float | None, timeout: float, warmup: int,
        seed: int | None, direct: bool, model_files: tuple[str, ...], startup_timeout: float) -> None:
    """Send requests and write one JSON line per request to stdout; the summary goes to stderr."""
    if concurrency is not None and rate is not None:
        raise BenchError("give either -c/--concurrency (closed loop) or --rate (open loop), not both")
    requests, from_lines = resolve_requests(input_path, input_name, shape, dtype, fill, count, seed)
    if request_count is None and duration is None:
        request_count = len(requests) if from_lines else DEFAULT_REQUESTS
    writer = ResultWriter(sys.stdout, sys.stderr, progress=sys.stderr.isatty())
    if direct:
        files = _split(model_files)
        if not files:
            raise BenchError("--direct needs --model-files (one MindIR per rank)")
        if rate is not None or (concurrency or 1) > 1 or duration is not None:
            raise BenchError("--direct makes its calls one after another: use --requests, not --rate, "
                             "--concurrency or --duration")
        writer.start()
        try:
            if len(files) == 1:
                run_direct_in_process(files[0], requests, request_count or DEFAULT_REQUESTS, max(1, warmup), writer)
            else:
                run_direct_group(files, requests, request_count or DEFAULT_REQUESTS, warmup, timeout,
                                 startup_timeout, writer)
        except KeyboardInterrupt:
            pass
        finally:
            records = writer.finish()
    else:
        if model_files:
            raise BenchError("--model-files only applies with --direct")
        load = ServiceLoad(address, servable, method, version_number, requests, timeout, writer)
        try:
            load.warm_up(warmup)
            writer.start()
            tickets = Tickets(request_count, duration)
            try:
                if rate is not None:
                    load.open_loop(tickets, rate, seed)
                else:
                    load.closed_loop(tickets, concurrency or 1)
            except KeyboardInterrupt:
                tickets.cancelled.set()
        finally:
            load.close()
            records = writer.finish() if writer.is_alive() else writer.records
    click.echo(format_summary(summarize(records)), err=True)


@bench.command()
@click.argument("files", nargs=-1)
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="also write a latency histogram and throughput-over-time figure (needs matplotlib)")
def report(files: tuple[str, ...], plot_path: str | None) -> None:
    """Summarise result lines from FILES (or stdin, or '-') written by `zmserve bench run`."""
    records: list[dict[str, Any]] = []
    for source in files or ("-",):
        records.extend(read_records(_open_lines(source), "stdin" if source == "-" else source))
    click.echo(format_summary(summarize(records)))
    if plot_path is not None:
        plot(records, plot_path)
        click.echo(f"wrote {plot_path}")


def plot(records: Sequence[Mapping[str, Any]], path: str) -> None:
    """Latency histogram (successful requests) and sends/answers per time bin, in one PNG."""
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'zmserve[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise BenchError("nothing to plot: no records")
    sends = np.array([r["send_time"] for r in records], dtype=np.float64)
    start = sends.min()
    sends -= start
    ends = sends + np.array([r["latency_ms"] for r in records], dtype=np.float64) / 1000.0
    latencies = [r["latency_ms"] for r in records if r["status"] == OK]
    width = max(0.1, float(ends.max()) / 20)
    edges = np.arange(0.0, float(ends.max()) + width, width)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if latencies:
        left.hist(latencies, bins=min(60, max(10, int(math.sqrt(len(latencies))))), color="tab:blue")
        marks = percentiles(latencies)
        for key in ("p50", "p99"):
            left.axvline(marks[key], color="tab:red", linestyle="--", linewidth=1)
            left.annotate(key, (marks[key], 1), xycoords=("data", "axes fraction"), xytext=(2, -12),
                          textcoords="offset points", color="tab:red")
    left.set(title=f"latency of {len(latencies)} OK requests", xlabel="ms", ylabel="requests")
    sent, _ = np.histogram(sends, edges)
    answered, _ = np.histogram(ends, edges)
    right.step(edges[:-1], sent / width, where="post", label="sent")
    right.step(edges[:-1], answered / width, where="post", label="answered")
    right.set(title="throughput over time", xlabel="s since first send", ylabel="req/s")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
