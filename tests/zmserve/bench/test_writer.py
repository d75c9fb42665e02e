"""The writer thread (zmserve/bench/writer.py)."""

from __future__ import annotations

import io
import json

import pytest

from tests.cluster import wait_for
from zmserve.bench import writer as writer_module
from zmserve.bench.records import Record
from zmserve.bench.writer import ResultWriter


def test_progress_line_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "PROGRESS_INTERVAL_S", 0.02)
    record = Record(0, 1.0, 2.0, "OK", 10, 2)
    for progress in (True, False):
        out, err = io.StringIO(), io.StringIO()
        writer = ResultWriter(out, err, progress=progress)
        writer.start()
        writer.put(record)
        if progress:
            wait_for(lambda err=err: "done 1" in err.getvalue(), timeout=5, what="the progress line")
        assert writer.finish() == [record]
        assert json.loads(out.getvalue()) == record.to_dict()
        assert ("\rsent 0  done 1  errors 0" in err.getvalue()) is progress


def test_records_put_before_start_are_kept() -> None:
    """A run that ends before its writer starts (a --part whose parent went away) still returns its records."""
    writer = ResultWriter(io.StringIO(), io.StringIO(), progress=False)
    writer.put(Record(7, 1.0, 1.0, "INTERNAL", 0, 0, "boom"))
    assert [r.id for r in writer.finish()] == [7]
