"""`zmserve bench report --plot` (zmserve/bench/plot.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from zmserve.bench.errors import BenchError
from zmserve.bench.plot import plot
from zmserve.bench.records import Record

RECORDS = [Record(i, 100.0 + i * 0.25, float(i + 1), "OK", 10, 2) for i in range(9)]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot(RECORDS, str(tmp_path / "out.png"))
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BenchError, match=r"pip install 'zmserve\[plot\]'"):
        plot(RECORDS[:1], str(tmp_path / "out.png"))
