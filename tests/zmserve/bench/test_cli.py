"""`zmserve bench run|report` flags, exit codes and output, without any service: `report` over known lines, and
`run` against an address where nothing listens (every request fails with the client's deadline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.cluster import free_port
from zmserve.bench.load import LoadSpec, Target
from zmserve.bench.processes import part_arguments, share
from zmserve.bench.records import Record
from zmserve.cli import main

BENCH = [sys.executable, "-m", "zmserve.cli", "bench"]
RUN_TIMEOUT_S = 60
KNOWN_JSONL = "".join(Record(i, 100.0 + i * 0.25, float(i + 1), "OK", 10, 2).to_json() + "\n" for i in range(9))
FAILED_LINE = Record(9, 103.0, 100.0, "UNAVAILABLE", 10, 0, "no worker serves 'm'").to_json() + "\n"


def bench(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *args], input=stdin, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


# ---- report -----------------------------------------------------------------------------------------------------
def test_report_over_a_pipe() -> None:
    result = bench(["report"], KNOWN_JSONL)
    assert result.returncode == 0, result.stderr
    # latencies 1..9 ms: p50 5, p90 8.2, p99 8.92; sends 100.0..102.0 -> 4 req/s; last answer at 102.009
    assert result.stdout.startswith("== bench report summary of 9 records from stdin ==\n")
    assert "requests    9 (OK 9)" in result.stdout
    assert "errors      none" in result.stdout
    assert "send rate   4.0 req/s" in result.stdout
    assert "p50 5.000  p90 8.200  p99 8.920  max 9.000" in result.stdout
    assert "duration    2.009 s" in result.stdout


def test_report_json_is_one_object() -> None:
    result = bench(["report", "--json"], KNOWN_JSONL)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    document = json.loads(line)
    assert (document["count"], document["ok"], document["errors"]) == (9, 9, {})
    assert document["req_per_s"] == pytest.approx(9 / 2.009)
    assert (document["p50_ms"], document["p90_ms"], document["p99_ms"], document["max_ms"]) == pytest.approx(
        (5.0, 8.2, 8.92, 9.0))


def test_report_fails_on_failed_records_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(KNOWN_JSONL)
    failed = bench(["report", str(tmp_path / "a.jsonl"), "-"], FAILED_LINE)
    assert failed.returncode == 1
    assert "requests    10 (OK 9)" in failed.stdout
    assert "errors      UNAVAILABLE 1" in failed.stdout
    assert "UNAVAILABLE: no worker serves 'm'" in failed.stdout
    assert "1 of 10 requests failed (UNAVAILABLE 1)" in failed.stderr
    allowed = bench(["report", "--json", "--allow-errors", str(tmp_path / "a.jsonl"), "-"], FAILED_LINE)
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["errors"] == {"UNAVAILABLE": 1}


def test_report_names_a_bad_line() -> None:
    result = bench(["report"], KNOWN_JSONL + '{"send_time": "soon"}\n')
    assert result.returncode != 0
    assert "stdin:10: 'send_time' must be a number" in result.stderr


# ---- run: flags ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "stdin", "fragment"),
    [
        (["--shape", "4x4", "-c", "2", "--rate", "5"], "", "not both"),
        (["--servable", "m"], '{"inputs": {"x": {"shape": [2]}}}\nnope\n', "stdin:2: not valid JSON"),
        (["--shape", "4y4"], "", "is not like 128x96"),
        (["--shape", "4x4", "--input", "-"], "", "either --shape or --input"),
        (["--input", "/no/such.jsonl", "--servable", "m"], "", "cannot read /no/such.jsonl"),
        (["--shape", "4x4"], "", "names no servable"),
        (["--shape", "4x4", "--processes", "2"], "", "names no servable"),
        (["--shape", "4x4", "--servable", "m", "--processes", "3", "-c", "2"], "", "-c 2 is fewer callers"),
        (["--shape", "4x4", "--servable", "m", "--processes", "3", "--requests", "2"], "", "--requests 2 is fewer"),
        (["--shape", "4x4", "--model-files", "a.mindir"], "", "only applies with --direct"),
        (["--direct", "--shape", "4x4"], "", "--direct needs --model-files"),
        (["--direct", "--model-files", "a.mindir", "--shape", "4x4", "--rate", "10"], "", "--direct makes its calls"),
        (["--direct", "--model-files", "a.mindir", "--shape", "4x4", "--processes", "2"], "", "--processes applies"),
        (["--direct", "--model-files", "/no/such.mindir", "--shape", "4x4"], "", "does not exist"),
    ],
)
def test_bad_flags_fail_clearly(args: list[str], stdin: str, fragment: str) -> None:
    """`zmserve bench [OPTIONS]` is `zmserve bench run [OPTIONS]`; piped stdin without --shape is the input."""
    result = CliRunner().invoke(main, ["bench", *args], input=stdin)
    assert result.exit_code != 0
    assert fragment in result.output


# ---- run: failed requests ------------------------------------------------------------------------------------------
def nothing_listens() -> list[str]:
    return ["--address", f"127.0.0.1:{free_port()}", "--servable", "m", "--shape", "2x2", "--timeout", "0.2",
            "--warmup", "0"]


def test_failed_requests_carry_their_message_and_fail_the_run() -> None:
    result = CliRunner().invoke(main, ["bench", "run", *nothing_listens(), "--requests", "2"])
    assert result.exit_code == 1
    records = [Record.from_json(line) for line in result.stdout.splitlines()]
    assert [r.id for r in records] == [0, 1]
    assert {r.status for r in records} == {"DEADLINE_EXCEEDED"}
    assert all(r.message and "deadline" in r.message for r in records)
    assert "== bench run summary ==" in result.stderr
    assert "2 of 2 requests failed (DEADLINE_EXCEEDED 2); --allow-errors exits 0 anyway" in result.stderr


def test_allow_errors_exits_zero() -> None:
    result = CliRunner().invoke(main, ["bench", "run", *nothing_listens(), "--requests", "1", "--allow-errors"])
    assert result.exit_code == 0, result.output
    assert "requests    1 (OK 0)" in result.stderr


def test_summary_once_when_stdout_is_piped_to_a_terminal_user(tmp_path: Path) -> None:
    """`zmserve bench run | zmserve bench report` in a terminal: the run says one line, the report has the table;
    with stderr not a terminal (scripts, logs) the run writes its own labelled summary."""
    controller, terminal = os.openpty()
    try:
        with subprocess.Popen([*BENCH, "run", *nothing_listens(), "--requests", "1", "--allow-errors"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal) as run:
            out, _ = run.communicate(timeout=RUN_TIMEOUT_S)
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert run.returncode == 0
    assert len(out.decode().splitlines()) == 1
    text = shown.decode()
    assert "== bench run summary ==" not in text
    assert "bench run: 1 requests, 1 failed" in text
    piped = bench(["run", *nothing_listens(), "--requests", "1", "--allow-errors"])
    assert piped.stderr.count("== bench run summary ==") == 1


# ---- --processes: how the load is split ----------------------------------------------------------------------------
def test_shares_add_up() -> None:
    for total, parts in [(10, 3), (3, 3), (100, 7), (5, 1)]:
        shares = [share(total, parts, i) for i in range(parts)]
        assert sum(shares) == total and max(shares) - min(shares) <= 1


def test_part_arguments_split_the_load(tmp_path: Path) -> None:
    target = Target("127.0.0.1:5600", "matmul", "predict", 0)
    lines = ['{"inputs": {"x": {"shape": [2]}}}', '{"inputs": {"x": {"shape": [3]}}}\n']
    closed = part_arguments(target, LoadSpec(5, None, 10, None, 2.0, 1, seed=7), lines, 3, tmp_path)

    def value(args: list[str], flag: str) -> str:
        return args[args.index(flag) + 1]

    assert [value(a, "-c") for a in closed] == ["2", "2", "1"]
    assert [value(a, "--requests") for a in closed] == ["4", "3", "3"]
    assert [value(a, "--part") for a in closed] == ["0/3", "1/3", "2/3"]
    assert [value(a, "--seed") for a in closed] == ["7", "8", "9"]
    assert all(value(a, "--servable") == "matmul" and value(a, "--address") == "127.0.0.1:5600" for a in closed)
    assert Path(value(closed[0], "--input")).read_text().splitlines() == [line.strip() for line in lines]
    opened = part_arguments(target, LoadSpec(None, 300.0, None, 5.0, 2.0, 1), lines, 4, tmp_path)
    assert {value(a, "--rate") for a in opened} == {"75.0"} and "-c" not in opened[0]
    assert {value(a, "--duration") for a in opened} == {"5.0"} and "--requests" not in opened[0]
