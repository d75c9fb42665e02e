"""`zmserve bench`: request parsing, the summary math, `report` over a pipe, and runs against a real TP2 cluster
and against bare shards (--direct)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from cluster import Cluster, export_matmul

from zmserve import bench
from zmserve.cli import main

BENCH = [sys.executable, "-m", "zmserve.cli", "bench"]
RUN_TIMEOUT_S = 120


def run_lines(lines: list[str], seed: int = 0) -> list[bench.RequestSpec]:
    return bench.read_requests(lines, "stdin", seed)


# ---- request lines ----------------------------------------------------------------------------------------------
def test_fills_shapes_and_instances() -> None:
    requests = run_lines([
        '{"servable": "matmul", "method": "predict", "inputs": {"x": {"shape": [128, 96], "dtype": "float32", '
        '"fill": 1.0}}}',
        "",
        '{"inputs": {"x": {"shape": [2, 3], "dtype": "int32", "fill": "zeros"}}, "instances": 3}',
        '{"inputs": {"x": {"shape": [4, 5], "fill": "random"}, "y": {"shape": [], "dtype": "float64", "fill": 2.5}}}',
    ])
    assert len(requests) == 3
    first, second, third = requests
    assert (first.servable, first.method) == ("matmul", "predict")
    x = first.instances[0]["x"]
    assert x.shape == (128, 96) and x.dtype == np.float32 and (x == 1.0).all()
    assert first.bytes_out == 128 * 96 * 4
    assert (second.servable, second.method) == (None, None)
    assert len(second.instances) == 3 and second.instances[0]["x"].dtype == np.int32
    assert (second.instances[2]["x"] == 0).all()
    assert third.instances[0]["x"].dtype == np.float32
    random = third.instances[0]["x"]
    assert ((random >= -1) & (random <= 1)).all() and len(np.unique(random)) > 1
    assert third.instances[0]["y"].shape == () and third.instances[0]["y"] == 2.5


def test_random_fill_is_reproducible_with_a_seed() -> None:
    line = ['{"inputs": {"x": {"shape": [8, 8], "fill": "random"}}}']
    np.testing.assert_array_equal(run_lines(line, seed=5)[0].instances[0]["x"],
                                  run_lines(line, seed=5)[0].instances[0]["x"])


def test_npy_input(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.save(tmp_path / "a.npy", array)
    (spec,) = run_lines([json.dumps({"inputs": {"x": {"npy": str(tmp_path / "a.npy")}}, "instances": 2})])
    assert len(spec.instances) == 2
    np.testing.assert_array_equal(spec.instances[1]["x"], array)
    assert spec.bytes_out == 2 * array.nbytes


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"servable": "m"}', "'inputs' must be a non-empty object"),
        ('{"inputs": {"x": {"shape": [2, -1]}}}', "'shape' must be a list of non-negative integers"),
        ('{"inputs": {"x": {"shape": "128x96"}}}', "'shape' must be a list"),
        ('{"inputs": {"x": {"shape": [2], "dtype": "complex64"}}}', "dtype 'complex64' is not one of"),
        ('{"inputs": {"x": {"shape": [2], "fill": "twos"}}}', "fill 'twos' is not one of"),
        ('{"inputs": {"x": {"shape": [2], "fil": 1}}}', "unknown keys ['fil']"),
        ('{"inputs": {"x": {"npy": "/no/such/file.npy"}}}', "cannot load '/no/such/file.npy'"),
        ('{"inputs": {"x": {"npy": "a.npy", "shape": [1]}}}', "'npy' cannot be combined"),
        ('{"inputs": {"x": {"shape": [2]}}, "instances": 0}', "'instances' must be a positive integer"),
        ('{"inputs": {"x": {"shape": [2]}}, "instance": 2}', "unknown keys ['instance']"),
        ('{"inputs": {"x": [1, 2]}}', "input 'x' must be an object"),
    ],
)
def test_bad_line_names_its_line_and_why(line: str, fragment: str) -> None:
    good = '{"inputs": {"x": {"shape": [2]}}}'
    with pytest.raises(bench.BenchError) as caught:
        run_lines([good, "", line])
    assert caught.value.message.startswith("stdin:3: ")
    assert fragment in caught.value.message


def test_no_lines_is_an_error() -> None:
    with pytest.raises(bench.BenchError, match="no requests"):
        run_lines(["", "  "])


def test_shape_and_fill_flags() -> None:
    assert bench.parse_shape("128x96") == [128, 96]
    assert bench.parse_shape("4,5,6") == [4, 5, 6]
    assert bench.parse_shape("") == []
    assert bench.parse_fill("random") == "random"
    assert bench.parse_fill("-0.5") == -0.5
    with pytest.raises(bench.BenchError):
        bench.parse_shape("128 by 96")
    with pytest.raises(bench.BenchError):
        bench.parse_fill("lots")


# ---- summary math -----------------------------------------------------------------------------------------------
def record(send_time: float, latency_ms: float, status: str = "OK") -> dict:
    return {"id": 0, "send_time": send_time, "latency_ms": latency_ms, "status": status, "bytes_out": 10,
            "bytes_in": 2}


def test_summary_against_hand_computed_values() -> None:
    records = [record(100.0, 1.0), record(100.5, 2.0), record(101.0, 3.0), record(101.5, 4.0),
               record(102.0, 1000.0, "DEADLINE_EXCEEDED"), record(102.5, 5.0, "UNAVAILABLE")]
    summary = bench.summarize(records)
    assert summary.requests == 6 and summary.ok == 4
    assert summary.errors == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    # first send 100.0, last answer 102.0 + 1.0 s = 103.0
    assert summary.duration_s == pytest.approx(3.0)
    assert summary.throughput_rps == pytest.approx(6 / 3.0)
    assert summary.ok_throughput_rps == pytest.approx(4 / 3.0)
    # 5 gaps over 2.5 s of sends
    assert summary.send_rate_rps == pytest.approx(2.0)
    # OK latencies 1, 2, 3, 4 ms; linear interpolation at rank q/100 * (n - 1): 1.5, 2.7, 2.97
    assert summary.latency_ms["p50"] == pytest.approx(2.5)
    assert summary.latency_ms["p90"] == pytest.approx(3.7)
    assert summary.latency_ms["p99"] == pytest.approx(3.97)
    assert summary.latency_ms["max"] == 4.0
    assert summary.latency_ms["mean"] == pytest.approx(2.5)
    assert (summary.bytes_out, summary.bytes_in) == (60, 12)
    table = bench.format_summary(summary)
    assert "requests    6 (OK 4)" in table
    assert "errors      DEADLINE_EXCEEDED 1, UNAVAILABLE 1" in table
    assert "p50 2.500  p90 3.700  p99 3.970  max 4.000" in table


def test_percentiles_of_one_to_ten() -> None:
    result = bench.percentiles([float(v) for v in range(10, 0, -1)])
    assert result["p50"] == pytest.approx(5.5)
    assert result["p90"] == pytest.approx(9.1)
    assert result["p99"] == pytest.approx(9.91)


def test_summary_of_nothing_and_of_errors_only() -> None:
    empty = bench.summarize([])
    assert (empty.requests, empty.duration_s, empty.latency_ms) == (0, 0.0, {})
    failed = bench.summarize([record(1.0, 5.0, "INTERNAL")])
    assert failed.ok == 0 and failed.latency_ms == {} and failed.send_rate_rps == 0.0
    assert "no successful requests" in bench.format_summary(failed)


# ---- report -----------------------------------------------------------------------------------------------------
KNOWN_JSONL = "".join(json.dumps({**record(100.0 + i * 0.25, float(i + 1)), "id": i}) + "\n" for i in range(9))


def test_report_over_a_pipe() -> None:
    result = subprocess.run([*BENCH, "report"], input=KNOWN_JSONL, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    # latencies 1..9 ms: p50 5, p90 8.2, p99 8.92; sends 100.0..102.0 -> 4 req/s; last answer at 102.009
    assert "requests    9 (OK 9)" in result.stdout
    assert "errors      none" in result.stdout
    assert "send rate   4.0 req/s" in result.stdout
    assert "p50 5.000  p90 8.200  p99 8.920  max 9.000" in result.stdout
    assert "duration    2.009 s" in result.stdout


def test_report_reads_files_and_stdin_together(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(KNOWN_JSONL)
    result = subprocess.run([*BENCH, "report", str(tmp_path / "a.jsonl"), "-"],
                            input=json.dumps(record(103.0, 100.0, "UNAVAILABLE")) + "\n",
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert "requests    10 (OK 9)" in result.stdout
    assert "errors      UNAVAILABLE 1" in result.stdout


def test_report_names_a_bad_line() -> None:
    result = subprocess.run([*BENCH, "report"], input=KNOWN_JSONL + '{"send_time": "soon"}\n',
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode != 0
    assert "stdin:10: 'send_time' must be a number" in result.stderr


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = bench.read_records(KNOWN_JSONL.splitlines(), "known")
    bench.plot(records, str(tmp_path / "out.png"))
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(bench.BenchError, match=r"pip install 'zmserve\[plot\]'"):
        bench.plot([record(1.0, 1.0)], str(tmp_path / "out.png"))


# ---- flags --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "stdin", "fragment"),
    [
        (["--shape", "4x4", "-c", "2", "--rate", "5"], "", "not both"),
        (["--servable", "m"], '{"inputs": {"x": {"shape": [2]}}}\nnope\n', "stdin:2: not valid JSON"),
        (["--shape", "4y4"], "", "is not like 128x96"),
        (["--shape", "4x4", "--input", "-"], "", "either --shape or --input"),
        (["--input", "/no/such.jsonl", "--servable", "m"], "", "cannot read /no/such.jsonl"),
        (["--shape", "4x4"], "", "names no servable"),
        (["--direct", "--shape", "4x4"], "", "--direct needs --model-files"),
        (["--direct", "--model-files", "a.mindir", "--shape", "4x4", "--rate", "10"], "", "--direct makes its calls"),
        (["--direct", "--model-files", "/no/such.mindir", "--shape", "4x4"], "", "does not exist"),
    ],
)
def test_bad_flags_fail_clearly(args: list[str], stdin: str, fragment: str) -> None:
    """`zmserve bench [OPTIONS]` is `zmserve bench run [OPTIONS]`; piped stdin without --shape is the input."""
    result = CliRunner().invoke(main, ["bench", *args], input=stdin)
    assert result.exit_code != 0
    assert fragment in result.output


def test_progress_line_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "PROGRESS_INTERVAL_S", 0.02)
    for progress in (True, False):
        out, err = io.StringIO(), io.StringIO()
        writer = bench.ResultWriter(out, err, progress=progress)
        writer.start()
        writer.put(record(1.0, 2.0))
        time.sleep(0.1)
        assert writer.finish() == [record(1.0, 2.0)]
        assert json.loads(out.getvalue()) == record(1.0, 2.0)
        assert ("\rsent 0  done 1  errors 0" in err.getvalue()) is progress


# ---- against a real TP2 cluster -----------------------------------------------------------------------------------
def test_open_loop_keeps_its_rate(matmul_tp2: Cluster) -> None:
    """400 Poisson arrivals at 200 req/s (~2 s). The seed fixes the schedule, whose own rate is 196.4/s: a
    unseeded 400-arrival schedule alone is off by more than 10% about one time in twenty."""
    seed = 9
    gaps = np.random.default_rng(seed).exponential(1 / 200, 399)
    scheduled_rate = 399 / gaps.sum()
    result = subprocess.run(
        [*BENCH, "run", "--address", matmul_tp2.client_address, "--servable", "matmul", "--shape", "128x96",
         "--rate", "200", "--requests", "400", "--seed", str(seed), "--timeout", "20"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 400 and sorted(r["id"] for r in records) == list(range(400))
    sends = sorted(r["send_time"] for r in records)
    achieved = (len(sends) - 1) / (sends[-1] - sends[0])
    assert abs(achieved - 200) <= 20, f"sent at {achieved:.1f}/s (schedule {scheduled_rate:.1f}/s)"
    assert "send rate" in result.stderr and "requests    400" in result.stderr


def test_run_piped_into_report(matmul_tp2: Cluster) -> None:
    """Requests as JSON lines on stdin -> `bench run` (closed loop) -> `bench report`."""
    lines = "\n".join([
        json.dumps({"servable": "matmul", "inputs": {"x": {"shape": [128, 96], "dtype": "float32", "fill": 1.0}}}),
        json.dumps({"servable": "matmul", "method": "predict", "instances": 2,
                    "inputs": {"x": {"shape": [128, 96], "dtype": "float32", "fill": "random"}}}),
    ]) + "\n"
    runner = subprocess.Popen([*BENCH, "run", "--address", matmul_tp2.client_address, "-c", "4", "--requests", "40"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reporter = subprocess.Popen([*BENCH, "report"], stdin=runner.stdout, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    assert runner.stdout is not None
    runner.stdout.close()
    try:
        _, run_err = runner.communicate(lines, timeout=RUN_TIMEOUT_S)
        report_out, report_err = reporter.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        for process in (runner, reporter):
            process.kill()
            process.wait()
    assert runner.returncode == 0, run_err
    assert reporter.returncode == 0, report_err
    assert "requests    40 (OK 40)" in report_out
    assert "errors      none" in report_out
    # lines alternate 1 and 2 instances of 128x96 float32 in, 128x16 float32 out each
    assert f"{(20 * 1 + 20 * 2) * 128 * 96 * 4 / 1e6:.2f} MB out" in report_out


# ---- --direct -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank_size", [1, 2])
def test_direct_runs_the_shards(tmp_path: Path, rank_size: int) -> None:
    model_files = export_matmul(tmp_path, rank_size)
    result = subprocess.run(
        [*BENCH, "run", "--direct", "--model-files", ",".join(map(str, model_files)), "--shape", "128x96",
         "--fill", "random", "--seed", "1", "--requests", "30", "--timeout", "30", "--startup-timeout", "120"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == list(range(30))
    assert all(r["status"] == "OK" for r in records)
    assert all(set(r) == set(bench.RECORD_FIELDS) for r in records)
    assert {(r["bytes_out"], r["bytes_in"]) for r in records} == {(128 * 96 * 4, 128 * 16 * 4)}
    assert "requests    30 (OK 30)" in result.stderr
