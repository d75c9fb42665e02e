"""Chaos, short: a minute of steady load on a rank_size-2 MatMul cluster while random agents are SIGKILLed; the
same code as `benchmarks/chaos.py` (which runs it for 5 minutes and more)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from cluster import REPO

pytestmark = pytest.mark.slow


def load_chaos() -> ModuleType:
    """benchmarks/ is not a package; the module must be in sys.modules before it runs (its dataclasses)."""
    spec = importlib.util.spec_from_file_location("zmserve_chaos_benchmark", REPO / "benchmarks" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


chaos = load_chaos()

DURATION_S = 50.0


def test_agents_killed_under_load(tmp_path: Path) -> None:
    summary = chaos.Chaos(tmp_path, DURATION_S, clients=3, timeout=5.0, seed=1).run()
    report = {k: v for k, v in summary.items() if k != "kill_log"}
    assert summary["violations"] == [], report
    assert summary["kills"] >= 2, report
    assert summary["recoveries"] == summary["kills"], report
    assert summary["answered"] == summary["requests_sent"] and summary["hung"] == 0, report
    assert summary["wrong_results"] == 0 and summary["ok"] > 0, report
    assert set(summary["errors_by_code"]) <= chaos.ALLOWED_ERRORS, report
    assert summary["orphans"] == [] and set(summary["exit_codes"].values()) == {0}, report
    print({k: summary[k] for k in ("requests_sent", "ok", "errors_by_code", "kills", "longest_outage_s",
                                   "mean_outage_s")})
