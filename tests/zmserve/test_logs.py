"""Bursts: a storm of one event is one line as it starts, then summary lines with the count, each covering twice
the time of the one before; never a line per occurrence."""

from __future__ import annotations

import json
from typing import Any

import pytest

from zmserve import logs
from zmserve.logs import Bursts, flush_bursts


class Recorder:
    """A logger that keeps (level, event, fields) instead of writing them."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str):
        return lambda event, **fields: self.lines.append((level, event, fields))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_single_event_is_logged_in_full_at_once(recorder: Recorder, clock: Clock) -> None:
    bursts = Bursts(recorder, interval=1.0, clock=clock)
    bursts.info("request_rejected", key="UNAVAILABLE", request_id=1, code="UNAVAILABLE", message="not ready")
    assert recorder.lines == [("info", "request_rejected",
                               {"request_id": 1, "code": "UNAVAILABLE", "message": "not ready"})]
    clock.now += 5
    bursts.flush()
    assert len(recorder.lines) == 1, "nothing repeated, so there is nothing to summarise"


def test_a_burst_is_one_line_then_summaries_with_the_count(recorder: Recorder, clock: Clock) -> None:
    bursts = Bursts(recorder, interval=1.0, max_interval=4.0, clock=clock)
    for request_id in range(15000):  # 15000 rejections over 15 s, 1 ms apart
        bursts.info("request_rejected", key="UNAVAILABLE", request_id=request_id, code="UNAVAILABLE")
        clock.now += 0.001
        bursts.flush()
    clock.now += 4
    bursts.flush()
    assert recorder.lines[0][2] == {"request_id": 0, "code": "UNAVAILABLE"}
    summaries = [fields for _, _, fields in recorder.lines[1:]]
    assert [round(s["seconds"]) for s in summaries] == [1, 2, 4, 4, 4], "intervals double, up to max_interval"
    assert sum(s["repeated"] for s in summaries) == 14999, "every occurrence is counted exactly once"
    assert all(990 <= s["per_second"] <= 1000 for s in summaries[:-1])
    assert summaries[-1]["request_id"] == 14999, "a summary carries the fields of the last occurrence"
    assert {event for _, event, _ in recorder.lines} == {"request_rejected"}


def test_after_a_quiet_interval_the_next_occurrence_is_logged_in_full(recorder: Recorder, clock: Clock) -> None:
    bursts = Bursts(recorder, interval=1.0, clock=clock)
    bursts.warning("late_reply_dropped", request_id=1)
    bursts.warning("late_reply_dropped", request_id=2)
    clock.now += 1.5
    bursts.flush()  # the summary of request 2
    clock.now += 2.5
    bursts.flush()  # a quiet interval (the next one is 2 s long) closes the burst
    bursts.warning("late_reply_dropped", request_id=3)
    assert [(level, fields) for level, _, fields in recorder.lines] == [
        ("warning", {"request_id": 1}),
        ("warning", {"request_id": 2, "repeated": 1, "seconds": 1.5, "per_second": 0.7}),
        ("warning", {"request_id": 3}),
    ]


def test_keys_are_counted_apart(recorder: Recorder, clock: Clock) -> None:
    bursts = Bursts(recorder, interval=1.0, clock=clock)
    for _ in range(3):
        bursts.info("request_rejected", key="UNAVAILABLE", code="UNAVAILABLE")
        bursts.info("request_rejected", key="RESOURCE_EXHAUSTED", code="RESOURCE_EXHAUSTED")
    bursts.flush(final=True)
    counts = {fields["code"]: fields.get("repeated", 0) for _, _, fields in recorder.lines}
    assert len(recorder.lines) == 4 and counts == {"UNAVAILABLE": 2, "RESOURCE_EXHAUSTED": 2}


def test_a_final_flush_writes_every_count_not_yet_written(recorder: Recorder, clock: Clock) -> None:
    bursts = Bursts(recorder, interval=1.0, clock=clock)
    for _ in range(10):
        bursts.info("request_failed", key="UNAVAILABLE")
    clock.now += 0.2
    bursts.flush()
    assert len(recorder.lines) == 1, "the interval is not over yet"
    flush_bursts(final=True)  # what a service loop does when it stops
    assert recorder.lines[-1][2] == {"repeated": 9, "seconds": 0.2, "per_second": 45.0}


def test_an_exception_burst_has_one_traceback_and_an_error_summary(recorder: Recorder, clock: Clock) -> None:
    bursts = Bursts(recorder, interval=1.0, clock=clock)
    for _ in range(3):
        try:
            raise ValueError("bad")
        except ValueError:
            bursts.exception("request_crashed")
    bursts.flush(final=True)
    assert [level for level, _, _ in recorder.lines] == ["exception", "error"]


def test_summary_lines_are_real_log_lines(capsys: pytest.CaptureFixture[str], clock: Clock) -> None:
    """Through the configured structlog logger: one JSON line per write, the count in it."""
    logs.configure_logging("info", json=True)
    try:
        bursts = Bursts(logs.get_logger("broker"), interval=1.0, clock=clock)
        for request_id in range(100):
            bursts.info("request_rejected", key="UNAVAILABLE", request_id=request_id)
        clock.now += 1
        bursts.flush()
    finally:
        with capsys.disabled():  # the configuration keeps the stream it was given: give it the real one back
            logs.configure_logging()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["event"], line.get("repeated"), line["request_id"]) for line in lines] == [
        ("request_rejected", None, 0), ("request_rejected", 99, 99)]
    assert lines[1]["component"] == "broker" and lines[1]["level"] == "info"
