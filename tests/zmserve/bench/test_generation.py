"""Generation mode's math (zmserve/bench/generation.py, the token part of summary.py and records.py): TTFT, ITL
and tokens/s from hand-made records, a record's round trip through its JSON line, the prompt lines and their
errors, and the records of a stream from its partials' arrival times. The slow test runs `zmserve bench
--prompts` against a real `zmserve serve` serving tests/generator_servable.py's generator method (the shared
echo_cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from tests import generator_servable
from zmserve.bench.generation import (
    generation_record,
    prompt_lines,
    prompt_request,
    random_prompts,
    read_prompts,
)
from zmserve.bench.records import Record
from zmserve.bench.requests import RequestSpec
from zmserve.bench.summary import format_summary, summarize, summary_json
from zmserve.client import InferStream
from zmserve.local import LocalCluster


def generation(send_time: float, latency_ms: float, tokens: int, ttft: float | None, gaps: tuple[float, ...],
               status: str = "OK") -> Record:
    return Record(0, send_time, latency_ms, status, 10, 2, None if status == "OK" else "why", tokens, ttft, gaps)


RECORDS = [generation(100.0, 500.0, 4, 20.0, (10.0, 30.0, 50.0)),
           generation(100.5, 1500.0, 2, 40.0, (90.0,)),
           generation(101.0, 5.0, 0, None, (), "UNAVAILABLE")]


def test_ttft_itl_and_tokens_per_second_against_hand_computed_values() -> None:
    summary = summarize(RECORDS)
    figures = summary.generation
    assert figures is not None
    assert figures.tokens == 6  # the failed request's tokens do not count
    assert summary.duration_s == pytest.approx(2.0)  # 100.0 .. 100.5 + 1.5
    assert figures.tokens_per_s == pytest.approx(3.0)
    assert figures.ttft_ms["p50"] == pytest.approx(30.0) and figures.ttft_ms["max"] == 40.0
    # gaps 10, 30, 50, 90: linear interpolation at q/100 * 3 -> p50 40, p90 78, p99 88.8
    assert figures.itl_ms["p50"] == pytest.approx(40.0)
    assert figures.itl_ms["p90"] == pytest.approx(78.0)
    assert figures.itl_ms["p99"] == pytest.approx(88.8)
    flat = summary_json(summary)
    assert (flat["tokens"], flat["tokens_per_s"], flat["ttft_p50_ms"], flat["itl_p90_ms"]) == (6, 3.0, 30.0,
                                                                                                pytest.approx(78.0))
    table = format_summary(summary, "run")
    assert "tokens      6 (3.0 tokens/s)" in table and "TTFT ms     p50 30.000" in table
    assert "tokens" not in summary_json(summarize([Record(0, 1.0, 1.0, "OK")])), "a tensor run has no token keys"


def test_a_generation_record_round_trips_through_its_line() -> None:
    record = RECORDS[0]
    line = record.to_json()
    assert json.loads(line)["itl_ms"] == [10.0, 30.0, 50.0]
    assert Record.from_json(line) == record
    with pytest.raises(ValueError, match="'itl_ms' must be a list of numbers"):
        Record.from_json(line.replace("[10.0, 30.0, 50.0]", '"x"'))


def test_prompt_lines_become_generation_requests_and_bad_ones_say_where() -> None:
    spec = prompt_request('{"prompt": "hi", "max_tokens": 3, "temperature": 0.5, "servable": "gpt"}')
    instance = spec.instances[0]
    assert spec.servable == "gpt" and instance["prompt"] == "hi" and int(instance["max_tokens"]) == 3
    assert float(instance["temperature"]) == 0.5 and int(instance["seed"]) == -1
    from zmserve.bench.errors import BenchError
    with pytest.raises(BenchError, match=r"prompts.jsonl:2: .*unknown keys \['beam'\]"):
        read_prompts(['{"prompt": "a"}', '{"prompt": "b", "beam": 2}'], "prompts.jsonl")
    with pytest.raises(BenchError, match="max_tokens must be at least 1"):
        read_prompts(['{"prompt": "a", "max_tokens": 0}'], "p")
    again = read_prompts(prompt_lines([spec]), "lines")[0]
    assert again.servable == "gpt" and {k: np.asarray(v).item() for k, v in again.instances[0].items()} == \
        {k: np.asarray(v).item() for k, v in instance.items()}, "prompt_lines makes the same requests again"
    prompts = random_prompts(3, 4, 7, seed=1)
    assert [len(p.instances[0]["prompt"].split()) for p in prompts] == [4, 4, 4]
    assert [p.instances[0]["prompt"] for p in prompts] == [p.instances[0]["prompt"] for p in random_prompts(3, 4, 7, 1)]


def test_a_streams_record_takes_ttft_and_gaps_from_the_partials_arrivals() -> None:
    stream = InferStream()
    future: Future = Future()
    stream.attach(future)
    stream.arrivals.extend([10.02, 10.05, 10.06])
    future.set_result([{"text": "abc", "token_ids": np.array([1, 2, 3], np.int32), "completion_tokens": np.int32(3)}])
    spec = RequestSpec(None, None, [{"prompt": "x"}])
    record = generation_record(7, 1000.0, 10.0, 10.10, spec, stream)
    assert (record.id, record.status, record.tokens) == (7, "OK", 3)
    assert record.ttft_ms == pytest.approx(20.0) and record.latency_ms == pytest.approx(100.0)
    assert record.itl_ms == pytest.approx((30.0, 10.0))


@pytest.mark.slow
def test_bench_streams_generations_from_a_prompt_file(echo_cluster: LocalCluster, tmp_path: Path) -> None:
    cluster = echo_cluster  # zmserve serve: partials through the in-process broker
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "abc", "max_tokens": 5}\n{"prompt": "x|yz", "max_tokens": 9}\n')
    result = subprocess.run(
        [sys.executable, "-m", "zmserve.cli", "bench", "--address", cluster.client_address, "--servable",
         generator_servable.SERVABLE, "--prompts", str(prompts), "-c", "2", "--requests", "6", "--timeout",
         "30"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = [Record.from_json(line) for line in result.stdout.splitlines()]
    assert len(records) == 6 and all(r.ok for r in records)
    by_prompt = {r.id % 2: r for r in records}
    assert by_prompt[0].tokens == 5 and len(by_prompt[0].itl_ms or ()) == 4, "one partial per token"
    assert by_prompt[1].tokens == 2 and by_prompt[1].ttft_ms is not None
    assert all(0 < (r.ttft_ms or 0) <= r.latency_ms for r in records)
    report = subprocess.run([sys.executable, "-m", "zmserve.cli", "bench", "report", "--json"],
                            input=result.stdout, capture_output=True, text=True, timeout=60)
    summary = json.loads(report.stdout)
    assert summary["tokens"] == 3 * (5 + 2) and summary["tokens_per_s"] > 0 and summary["ttft_p50_ms"] > 0

    open_loop = subprocess.run(
        [sys.executable, "-m", "zmserve.cli", "bench", "--address", cluster.client_address, "--servable",
         generator_servable.SERVABLE, "--random-prompts", "--max-tokens", "3", "--rate", "20", "--requests",
         "4", "--seed", "1", "--timeout", "30"], capture_output=True, text=True, timeout=120)
    assert open_loop.returncode == 0, open_loop.stderr
    records = [Record.from_json(line) for line in open_loop.stdout.splitlines()]
    assert len(records) == 4 and {r.tokens for r in records} == {3} and all(len(r.itl_ms or ()) == 2
                                                                            for r in records)
    assert "TTFT ms" in open_loop.stderr and "tokens/s" in open_loop.stderr

    spread = subprocess.run(
        [sys.executable, "-m", "zmserve.cli", "bench", "--address", cluster.client_address, "--servable",
         generator_servable.SERVABLE, "--random-prompts", "--max-tokens", "4", "--processes", "2", "-c", "2",
         "--requests", "6", "--seed", "3", "--timeout", "30"], capture_output=True, text=True, timeout=180)
    assert spread.returncode == 0, spread.stderr
    records = [Record.from_json(line) for line in spread.stdout.splitlines()]
    assert sorted(r.id for r in records) == list(range(6)) and {r.tokens for r in records} == {4}
