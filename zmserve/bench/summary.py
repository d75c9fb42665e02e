"""What a run amounts to, from its records alone (pure: no clock, no IO): a table for people, one JSON object
for scripts.

Duration runs from the first send to the last answer; throughput counts every answered request over it; send
rate is (n - 1) / (last send - first send), the offered load actually achieved. Latency percentiles cover the
requests that succeeded, with numpy's default "linear" method (Hyndman-Fan type 7).

A generation run (records with `tokens`) adds: time to first token and inter-token latency percentiles (over the
requests that succeeded, ITL over every gap of them), their completion tokens, and tokens/s = those tokens over
the run's duration.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zmserve.bench.records import Record

PERCENTILES = (50, 90, 99)
MESSAGE_WIDTH = 160
"""Longest error message the table shows (the records hold the whole message)."""


@dataclass(frozen=True)
class Summary:
    requests: int
    ok: int
    errors: dict[str, int]
    duration_s: float
    throughput_rps: float
    ok_throughput_rps: float
    send_rate_rps: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    bytes_out: int = 0
    bytes_in: int = 0
    first_messages: dict[str, str] = field(default_factory=dict)
    """The first failed record's message for each error code."""
    generation: GenerationSummary | None = None
    """Token figures, when the records are a generation run's."""

    @property
    def failed(self) -> int:
        return self.requests - self.ok


@dataclass(frozen=True)
class GenerationSummary:
    tokens: int
    tokens_per_s: float
    ttft_ms: dict[str, float] = field(default_factory=dict)
    itl_ms: dict[str, float] = field(default_factory=dict)


def percentiles(values: Sequence[float], points: Sequence[float] = PERCENTILES) -> dict[str, float]:
    """`p50`, `p90`, ... with numpy's linear interpolation, plus `max` and `mean`; empty -> {}."""
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    result = {f"p{p:g}": float(v) for p, v in zip(points, np.percentile(array, points, method="linear"),
                                                  strict=True)}
    result["max"] = float(array.max())
    result["mean"] = float(array.mean())
    return result


def summarize(records: Sequence[Record]) -> Summary:
    if not records:
        return Summary(0, 0, {}, 0.0, 0.0, 0.0, 0.0)
    sends = np.array([r.send_time for r in records], dtype=np.float64)
    ends = sends + np.array([r.latency_ms for r in records], dtype=np.float64) / 1000.0
    statuses = Counter(r.status for r in records)
    ok = sum(1 for r in records if r.ok)
    first_messages: dict[str, str] = {}
    for r in records:
        if not r.ok and r.message and r.status not in first_messages:
            first_messages[r.status] = r.message
    duration = float(ends.max() - sends.min())
    send_span = float(sends.max() - sends.min())
    count = len(records)
    return Summary(
        requests=count,
        ok=ok,
        errors={code: n for code, n in sorted(statuses.items()) if code != "OK"},
        duration_s=duration,
        throughput_rps=count / duration if duration > 0 else 0.0,
        ok_throughput_rps=ok / duration if duration > 0 else 0.0,
        send_rate_rps=(count - 1) / send_span if send_span > 0 else 0.0,
        latency_ms=percentiles([r.latency_ms for r in records if r.ok]),
        bytes_out=sum(r.bytes_out for r in records),
        bytes_in=sum(r.bytes_in for r in records),
        first_messages=dict(sorted(first_messages.items())),
        generation=summarize_generation(records, duration),
    )


def summarize_generation(records: Sequence[Record], duration: float) -> GenerationSummary | None:
    """Token figures of the records that are generations (None when none is)."""
    generations = [r for r in records if r.tokens is not None]
    if not generations:
        return None
    ok = [r for r in generations if r.ok]
    tokens = sum(r.tokens or 0 for r in ok)
    return GenerationSummary(
        tokens=tokens,
        tokens_per_s=tokens / duration if duration > 0 else 0.0,
        ttft_ms=percentiles([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        itl_ms=percentiles([gap for r in ok for gap in (r.itl_ms or ())]),
    )


def format_summary(summary: Summary, title: str) -> str:
    """The summary as a small table for people, under a title line saying whose summary it is."""
    errors = ", ".join(f"{code} {n}" for code, n in summary.errors.items()) or "none"
    if summary.latency_ms:
        latency = "  ".join(f"{key} {summary.latency_ms[key]:.3f}" for key in (*(f"p{p}" for p in PERCENTILES),
                                                                                "max"))
    else:
        latency = "- (no successful requests)"
    rows = [
        ("requests", f"{summary.requests} (OK {summary.ok})"),
        ("errors", errors),
        *(("", f"{code}: {_shorten(message)}") for code, message in summary.first_messages.items()),
        ("duration", f"{summary.duration_s:.3f} s"),
        ("send rate", f"{summary.send_rate_rps:.1f} req/s"),
        ("throughput", f"{summary.throughput_rps:.1f} req/s (OK {summary.ok_throughput_rps:.1f} req/s)"),
        ("latency ms", latency),
        ("payload", f"{summary.bytes_out / 1e6:.2f} MB out, {summary.bytes_in / 1e6:.2f} MB in"),
    ]
    if summary.generation is not None:
        generation = summary.generation
        rows += [
            ("tokens", f"{generation.tokens} ({generation.tokens_per_s:.1f} tokens/s)"),
            ("TTFT ms", _percentile_row(generation.ttft_ms)),
            ("ITL ms", _percentile_row(generation.itl_ms)),
        ]
    return "\n".join([f"== {title} ==", *(f"{name:<11} {value}" for name, value in rows)])


def _percentile_row(values: dict[str, float]) -> str:
    if not values:
        return "-"
    return "  ".join(f"{key} {values[key]:.3f}" for key in (*(f"p{p}" for p in PERCENTILES), "max"))


def _shorten(message: str) -> str:
    line = " ".join(message.split())
    return line if len(line) <= MESSAGE_WIDTH else line[:MESSAGE_WIDTH - 3] + "..."


def summary_json(summary: Summary) -> dict[str, Any]:
    """The summary as one flat JSON object (`zmserve bench report --json`); latencies are null when no request
    succeeded."""
    latency = {f"{key}_ms": summary.latency_ms.get(key) for key in (*(f"p{p}" for p in PERCENTILES), "max",
                                                                    "mean")}
    return {
        "count": summary.requests,
        "ok": summary.ok,
        "errors": summary.errors,
        "duration_s": summary.duration_s,
        "req_per_s": summary.throughput_rps,
        "ok_req_per_s": summary.ok_throughput_rps,
        "send_rate_req_per_s": summary.send_rate_rps,
        **latency,
        "bytes_out": summary.bytes_out,
        "bytes_in": summary.bytes_in,
        "first_messages": summary.first_messages,
        **generation_json(summary.generation),
    }


def generation_json(generation: GenerationSummary | None) -> dict[str, Any]:
    """The token figures as flat keys (`tokens`, `tokens_per_s`, `ttft_p50_ms`, ..., `itl_p99_ms`, ...); none for
    a run that is not a generation."""
    if generation is None:
        return {}
    keys = (*(f"p{p}" for p in PERCENTILES), "max", "mean")
    return {"tokens": generation.tokens, "tokens_per_s": generation.tokens_per_s,
            **{f"ttft_{key}_ms": generation.ttft_ms.get(key) for key in keys},
            **{f"itl_{key}_ms": generation.itl_ms.get(key) for key in keys}}
