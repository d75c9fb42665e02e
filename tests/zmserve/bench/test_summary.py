"""The summary math and its two renderings (zmserve/bench/summary.py)."""

from __future__ import annotations

import json

import pytest

from zmserve.bench.records import Record
from zmserve.bench.summary import format_summary, percentiles, summarize, summary_json


def record(send_time: float, latency_ms: float, status: str = "OK", message: str | None = None) -> Record:
    return Record(0, send_time, latency_ms, status, 10, 2, message)


RECORDS = [record(100.0, 1.0), record(100.5, 2.0), record(101.0, 3.0), record(101.5, 4.0),
           record(102.0, 1000.0, "DEADLINE_EXCEEDED", "no reply before the deadline"),
           record(102.5, 5.0, "UNAVAILABLE", "no worker serves 'm'"),
           record(102.6, 5.0, "UNAVAILABLE", "a second message, not shown")]


def test_summary_against_hand_computed_values() -> None:
    summary = summarize(RECORDS[:6])
    assert summary.requests == 6 and summary.ok == 4 and summary.failed == 2
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


def test_table_is_labelled_and_shows_each_codes_first_message() -> None:
    table = format_summary(summarize(RECORDS), "bench run summary")
    lines = table.splitlines()
    assert lines[0] == "== bench run summary =="
    assert "requests    7 (OK 4)" in lines
    assert "errors      DEADLINE_EXCEEDED 1, UNAVAILABLE 2" in lines
    assert "            DEADLINE_EXCEEDED: no reply before the deadline" in lines
    assert "            UNAVAILABLE: no worker serves 'm'" in lines
    assert "second message" not in table
    assert "latency ms  p50 2.500  p90 3.700  p99 3.970  max 4.000" in lines


def test_json_summary_is_one_object_with_the_numbers_scripts_need() -> None:
    document = json.loads(json.dumps(summary_json(summarize(RECORDS[:6]))))
    assert document["count"] == 6 and document["ok"] == 4
    assert document["errors"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    assert document["req_per_s"] == pytest.approx(2.0)
    assert (document["p50_ms"], document["p90_ms"], document["p99_ms"], document["max_ms"]) == pytest.approx(
        (2.5, 3.7, 3.97, 4.0))
    failed_only = summary_json(summarize([record(1.0, 5.0, "INTERNAL", "boom")]))
    assert failed_only["p50_ms"] is None and failed_only["max_ms"] is None
    assert failed_only["first_messages"] == {"INTERNAL": "boom"}


def test_percentiles_of_one_to_ten() -> None:
    result = percentiles([float(v) for v in range(10, 0, -1)])
    assert result["p50"] == pytest.approx(5.5)
    assert result["p90"] == pytest.approx(9.1)
    assert result["p99"] == pytest.approx(9.91)


def test_summary_of_nothing_and_of_errors_only() -> None:
    empty = summarize([])
    assert (empty.requests, empty.duration_s, empty.latency_ms) == (0, 0.0, {})
    failed = summarize([record(1.0, 5.0, "INTERNAL")])
    assert failed.ok == 0 and failed.latency_ms == {} and failed.send_rate_rps == 0.0
    assert "no successful requests" in format_summary(failed, "x")
