"""`zmserve bench run|report`: the command line over the bench's modules (registered in zmserve/cli.py).

`run` writes one record per request to stdout (see records.py) and its summary to stderr, labelled; when stdout
is piped and stderr is a terminal (`zmserve bench run ... | zmserve bench report`), it writes one line instead,
so the terminal shows the summary once, from `report`. Either command exits non-zero when any request failed,
unless `--allow-errors`.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import click

from zmserve.bench.direct import run_direct_group, run_direct_in_process, whole_rank_set
from zmserve.bench.errors import BenchError
from zmserve.bench.generation import GENERATE_METHOD, GenerationLoad, prompt_lines, random_prompts, read_prompts
from zmserve.bench.lines import STDIN, open_lines, source_name
from zmserve.bench.load import LoadSpec, ServiceLoad, Target, request_targets, run_threads
from zmserve.bench.processes import announce_ready_and_wait, parse_part, part_arguments, run_in_processes
from zmserve.bench.records import Record, read_records
from zmserve.bench.requests import RequestSpec, generated_line, generated_request, read_requests
from zmserve.bench.summary import Summary, format_summary, summarize, summary_json
from zmserve.bench.writer import ResultWriter
from zmserve.codec import ALLOWED_DTYPES
from zmserve.trace import span_summary

DEFAULT_ADDRESS = "127.0.0.1:5500"
DEFAULT_REQUESTS = 100
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_STARTUP_TIMEOUT_S = 180.0


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


def resolve_requests(input_path: str | None, input_name: str, shape: str | None, dtype: str, fill: str,
                     count: int, seed: int | None) -> tuple[list[RequestSpec], list[str] | None]:
    """The requests to cycle through, and the lines they came from (None when generated from --shape)."""
    if input_path is None and shape is None:
        if sys.stdin.isatty():
            raise BenchError("no requests: give --shape (with --input-name/--dtype/--fill) or pipe JSON lines "
                             "on stdin (--input -)")
        input_path = STDIN
    if input_path is None:
        return [generated_request(input_name, shape or "", dtype, fill, count, seed)], None
    if shape is not None:
        raise BenchError("give either --shape or --input, not both")
    lines = list(open_lines(input_path))
    return read_requests(lines, source_name(input_path), seed), lines


@bench.command()
@click.option("--address", default=DEFAULT_ADDRESS, show_default=True,
              help="the broker's client address (HOST:PORT, tcp://HOST:PORT or ipc://PATH)")
@click.option("--servable", default=None,
              help="servable to call (a request line's \"servable\" wins; needed unless every line names one)")
@click.option("--method", default=None,
              help="method to call (a line's \"method\" wins); default predict, or generate with --prompts")
@click.option("--version", "version_number", default=0, show_default=True, type=click.IntRange(min=0),
              help="servable version; 0 = newest")
@click.option("--input", "input_path", default=None,
              help="JSON-lines request file, '-' for stdin (the default when stdin is piped and no --shape)")
@click.option("--input-name", default="x", show_default=True, help="with --shape: the input's name")
@click.option("--shape", default=None, help="generate requests: input shape like 128x96 (default: read --input)")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(sorted(ALLOWED_DTYPES)),
              help="with --shape: the input's dtype")
@click.option("--fill", default="ones", show_default=True, help="with --shape: ones | zeros | random | a number")
@click.option("--count", default=1, show_default=True, type=click.IntRange(min=1), help="instances per request")
@click.option("-c", "--concurrency", default=None, type=click.IntRange(min=1),
              help="closed loop: this many callers, each waiting for its answer (default 1, or one per process)")
@click.option("--rate", default=None, type=click.FloatRange(min=0, min_open=True),
              help="open loop: Poisson arrivals at this many requests/s in all (default: closed loop, -c)")
@click.option("--processes", default=None, type=click.IntRange(min=1),
              help="spread the callers (or the rate) and the requests over this many OS processes, their records "
                   "merged into one stream; default: threads of this process")
@click.option("--requests", "request_count", default=None, type=click.IntRange(min=1),
              help=f"requests to send (default: each input line once, or {DEFAULT_REQUESTS})")
@click.option("--duration", default=None, type=click.FloatRange(min=0, min_open=True),
              help="seconds to send for (default: send --requests)")
@click.option("--timeout", default=DEFAULT_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="per request, seconds")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0),
              help="unrecorded requests sent first (by each process with --processes)")
@click.option("--seed", default=None, type=int,
              help="seed for random fills and arrival times (default: a new one each run)")
@click.option("--allow-errors", is_flag=True, help="exit 0 even when some requests failed")
@click.option("--direct", is_flag=True, help="no service: run --model-files in-process (one process per rank)")
@click.option("--model-files", multiple=True,
              help="with --direct: one MindIR per rank, every rank of the model (comma list or repeated)")
@click.option("--startup-timeout", default=DEFAULT_STARTUP_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="seconds for the --direct group to form, or for every --processes process to warm up")
@click.option("--broker-key", type=click.Path(exists=True, dir_okay=False),
              help="CURVE: the broker's public key (.key); needs --secret-key")
@click.option("--secret-key", type=click.Path(exists=True, dir_okay=False),
              help="CURVE: this client's key pair (.key_secret); needs --broker-key")
@click.option("--prompts", "prompts_path", default=None,
              help="generation mode: a JSON-lines file of prompts ({\"prompt\": ..., \"max_tokens\": N, ...}), "
                   "'-' for stdin; each request streams, its record adds tokens, TTFT and inter-token gaps")
@click.option("--random-prompts", is_flag=True, help="generation mode with random prompts (--prompt-words, "
                                                      "--max-tokens; seeded by --seed)")
@click.option("--prompt-words", default=8, show_default=True, type=click.IntRange(min=1),
              help="with --random-prompts: words per prompt")
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(min=1),
              help="with --random-prompts: tokens to generate per request")
@click.option("--trace", "trace_every", default=0, show_default=True, type=click.IntRange(min=0),
              help="trace one request in N (closed loop, threads): its record gets `spans`, the µs between hops "
                   "(client, broker, worker, agent, model), and stderr a per-span summary line; 0 = off")
@click.option("--part", default=None, hidden=True, help="internal: this process is part I/N of a --processes run")
def run(address: str, servable: str | None, method: str | None, version_number: int, input_path: str | None,
        input_name: str, shape: str | None, dtype: str, fill: str, count: int, concurrency: int | None,
        rate: float | None, processes: int | None, request_count: int | None, duration: float | None,
        timeout: float, warmup: int, seed: int | None, allow_errors: bool, direct: bool,
        model_files: tuple[str, ...], startup_timeout: float, broker_key: str | None, secret_key: str | None,
        prompts_path: str | None, random_prompts: bool, prompt_words: int, max_tokens: int,
        trace_every: int, part: str | None) -> None:
    """Send requests and write one JSON line per request to stdout; the summary goes to stderr (one line
    instead when stdout is a pipe and stderr a terminal: `zmserve bench report` at the other end shows it).
    Exits 1 when any request failed, unless --allow-errors."""
    if concurrency is not None and rate is not None:
        raise BenchError("give either -c/--concurrency (closed loop) or --rate (open loop), not both")
    if prompts_path is not None or random_prompts:
        run_generation(GenerationRun(prompts_path, random_prompts, prompt_words, max_tokens),
                       Target(address, servable, method or GENERATE_METHOD, version_number, broker_key, secret_key),
                       LoadSpec(concurrency, rate, request_count, duration, timeout, warmup, seed),
                       Parts(processes, part, startup_timeout),
                       conflicts={"--input": input_path, "--shape": shape, "--direct": direct or None},
                       allow_errors=allow_errors)
        return
    method = method or "predict"
    if trace_every and (rate is not None or processes is not None or direct):
        raise BenchError("--trace traces the closed loop of one process: not with --rate, --processes or --direct")
    requests, lines = resolve_requests(input_path, input_name, shape, dtype, fill, count, seed)
    if request_count is None and duration is None:
        request_count = len(requests) if lines is not None else DEFAULT_REQUESTS
    spec = LoadSpec(concurrency, rate, request_count, duration, timeout, warmup, seed)
    target = Target(address, servable, method, version_number, broker_key, secret_key)
    part_of = parse_part(part) if part is not None else None
    writer = ResultWriter(sys.stdout, sys.stderr, progress=sys.stderr.isatty() and part_of is None)
    if direct:
        records = run_direct(_split(model_files), requests, spec, processes, startup_timeout, writer)
    elif model_files:
        raise BenchError("--model-files only applies with --direct")
    elif processes is not None and part_of is None:
        request_targets(requests, servable, method)
        request_lines = lines or [generated_line(input_name, shape or "", dtype, fill, count)]
        with tempfile.TemporaryDirectory(prefix="zmserve-bench-") as workdir:
            arguments = part_arguments(target, spec, request_lines, processes, Path(workdir))
            records = run_processes(arguments, writer, startup_timeout)
    else:
        offset, stride = part_of or (0, 1)
        load = ServiceLoad(target, requests, timeout, writer, offset, stride)
        load.trace_every = trace_every
        records = run_threads(load, spec, writer, announce_ready_and_wait if part_of is not None else None)
    if trace_every:
        traced = [record.spans for record in records if record.spans]
        print(json.dumps({"traced": len(traced), "spans": span_summary(traced)}), file=sys.stderr)
    if part_of is None:  # a part's records are judged by the process that merges them
        summary = summarize(records)
        show_run_summary(summary)
        check_failures(summary, allow_errors)


@dataclass(frozen=True)
class GenerationRun:
    prompts_path: str | None
    random_prompts: bool
    prompt_words: int
    max_tokens: int


@dataclass(frozen=True)
class Parts:
    """--processes (this process starts the parts), or --part (this process is one)."""

    processes: int | None
    part: str | None
    startup_timeout: float


def run_generation(run: GenerationRun, target: Target, spec: LoadSpec, parts: Parts, conflicts: dict[str, object],
                   allow_errors: bool) -> None:
    """Generation mode: streamed requests from prompt lines (or random prompts), closed or open loop, from threads
    of this process or spread over --processes (each part gets the prompts as a --prompts file)."""
    given = [option for option, value in conflicts.items() if value is not None]
    if given:
        raise BenchError(f"{', '.join(given)} do not apply to generation mode (--prompts, --random-prompts)")
    if run.prompts_path is not None and run.random_prompts:
        raise BenchError("give either --prompts or --random-prompts, not both")
    count = spec.requests or DEFAULT_REQUESTS
    if run.prompts_path is not None:
        requests = read_prompts(open_lines(run.prompts_path), source_name(run.prompts_path))
    else:
        requests = random_prompts(count, run.prompt_words, run.max_tokens, spec.seed)
    if spec.requests is None and spec.duration is None:
        spec = replace(spec, requests=len(requests))
    part_of = parse_part(parts.part) if parts.part is not None else None
    writer = ResultWriter(sys.stdout, sys.stderr, progress=sys.stderr.isatty() and part_of is None)
    if parts.processes is not None and part_of is None:
        request_targets(requests, target.servable, target.method)
        with tempfile.TemporaryDirectory(prefix="zmserve-bench-") as workdir:
            arguments = part_arguments(target, spec, prompt_lines(requests), parts.processes, Path(workdir),
                                       input_option="--prompts")
            records = run_processes(arguments, writer, parts.startup_timeout)
    else:
        offset, stride = part_of or (0, 1)
        load = GenerationLoad(target, requests, spec.timeout, writer, offset, stride)
        records = run_threads(load, spec, writer, announce_ready_and_wait if part_of is not None else None)
    if part_of is None:  # a part's records are judged by the process that merges them
        summary = summarize(records)
        show_run_summary(summary)
        check_failures(summary, allow_errors)


def run_processes(arguments: list[list[str]], writer: ResultWriter, startup_timeout: float) -> list[Record]:
    writer.start()
    try:
        run_in_processes(arguments, writer, startup_timeout)
    except KeyboardInterrupt:
        pass
    finally:
        records = writer.finish()
    return records


def run_direct(model_files: list[str], requests: list[RequestSpec], spec: LoadSpec, processes: int | None,
               startup_timeout: float, writer: ResultWriter) -> list[Record]:
    if not model_files:
        raise BenchError("--direct needs --model-files (every rank's MindIR)")
    if processes is not None:
        raise BenchError("--processes applies to the service; --direct makes its calls one after another")
    if spec.rate is not None or (spec.concurrency or 1) > 1 or spec.duration is not None:
        raise BenchError("--direct makes its calls one after another: use --requests, not --rate, "
                         "--concurrency or --duration")
    model_files = whole_rank_set(model_files)
    calls = spec.requests or DEFAULT_REQUESTS
    writer.start()
    try:
        if len(model_files) == 1:
            run_direct_in_process(model_files[0], requests, calls, max(1, spec.warmup), writer)
        else:
            run_direct_group(model_files, requests, calls, spec.warmup, spec.timeout, startup_timeout, writer)
    except KeyboardInterrupt:
        pass
    finally:
        records = writer.finish()
    return records


def show_run_summary(summary: Summary) -> None:
    """The run's summary on stderr, or one line when the terminal will show `report`'s summary of the pipe."""
    if _stdout_is_pipe() and sys.stderr.isatty():
        click.echo(f"bench run: {summary.requests} requests, {summary.failed} failed (the summary is for "
                   f"whatever reads the pipe, such as `zmserve bench report`)", err=True)
    else:
        click.echo(format_summary(summary, "bench run summary"), err=True)


def _stdout_is_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def check_failures(summary: Summary, allow_errors: bool) -> None:
    """Any failed request makes the exit code non-zero, unless the caller allows it."""
    if summary.failed and not allow_errors:
        errors = ", ".join(f"{code} {n}" for code, n in summary.errors.items())
        raise BenchError(f"{summary.failed} of {summary.requests} requests failed ({errors}); "
                         f"--allow-errors exits 0 anyway")


@bench.command()
@click.argument("files", nargs=-1)
@click.option("--json", "as_json", is_flag=True,
              help="print the summary as one JSON object (count, errors by code, req/s, p50/p90/p99/max ms, ...)")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="also write a latency histogram and throughput-over-time figure (needs matplotlib)")
@click.option("--allow-errors", is_flag=True, help="exit 0 even when some records are failed requests")
def report(files: tuple[str, ...], as_json: bool, plot_path: str | None, allow_errors: bool) -> None:
    """Summarise result lines from FILES (or stdin, or '-') written by `zmserve bench run`. Exits 1 when any
    record is a failed request, unless --allow-errors."""
    sources: Sequence[str] = files or (STDIN,)
    records: list[Record] = []
    for source in sources:
        records.extend(read_records(open_lines(source), source_name(source)))
    summary = summarize(records)
    if as_json:
        click.echo(json.dumps(summary_json(summary)))
    else:
        names = ", ".join(source_name(source) for source in sources)
        click.echo(format_summary(summary, f"bench report summary of {len(records)} records from {names}"))
    if plot_path is not None:
        from zmserve.bench.plot import plot

        plot(records, plot_path)
        click.echo(f"wrote {plot_path}", err=as_json)
    check_failures(summary, allow_errors)
