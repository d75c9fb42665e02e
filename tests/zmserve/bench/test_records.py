"""Result lines (zmserve/bench/records.py)."""

from __future__ import annotations

import json

import pytest

from zmserve.bench.errors import BenchError
from zmserve.bench.records import OK, RECORD_FIELDS, Record, read_records


def test_measured_rounds_and_keeps_the_message_of_failures_only() -> None:
    ok = Record.measured(3, 100.1234567, 0.0012345678, OK, 10, 2, message="ignored for OK")
    assert (ok.send_time, ok.latency_ms, ok.message) == (100.123457, 1.2346, None)
    failed = Record.measured(4, 100.0, 0.5, "INVALID_ARGUMENT", 10, 0, "input 'x' has shape [4, 4], expected [128, 96]")
    assert not failed.ok and failed.message == "input 'x' has shape [4, 4], expected [128, 96]"
    assert Record.measured(5, 1.0, 1.0, "INTERNAL", 0, 0).message == "INTERNAL"


def test_json_round_trip() -> None:
    ok = Record(1, 100.5, 2.25, OK, 48, 8)
    failed = Record(2, 101.0, 30.0, "UNAVAILABLE", 48, 0, "no worker serves 'm'")
    assert set(json.loads(ok.to_json())) == set(RECORD_FIELDS)
    assert json.loads(failed.to_json())["message"] == "no worker serves 'm'"
    assert Record.from_json(ok.to_json()) == ok
    assert Record.from_json(failed.to_json()) == failed
    assert failed.end_time == pytest.approx(101.03)


def test_lines_from_other_tools_default_what_they_lack() -> None:
    record = Record.from_json('{"send_time": 1, "latency_ms": 2, "status": "OK"}')
    assert (record.id, record.bytes_out, record.bytes_in, record.message) == (-1, 0, 0, None)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"send_time": "soon", "latency_ms": 1, "status": "OK"}', "'send_time' must be a number"),
        ('{"send_time": 1, "latency_ms": true, "status": "OK"}', "'latency_ms' must be a number"),
        ('{"send_time": 1, "latency_ms": 1, "status": 200}', "'status' must be a string"),
        ('{"send_time": 1, "latency_ms": 1, "status": "OK", "bytes_in": 1.5}', "'bytes_in' must be an integer"),
        ('{"send_time": 1, "latency_ms": 1, "status": "X", "message": 3}', "'message' must be a string"),
        ("[]", "must be a JSON object"),
    ],
)
def test_bad_result_line_names_its_line(line: str, fragment: str) -> None:
    good = Record(0, 1.0, 1.0, OK).to_json()
    with pytest.raises(BenchError) as caught:
        read_records([good, line], "run.jsonl")
    assert caught.value.message.startswith("run.jsonl:2: ") and fragment in caught.value.message
