"""`zmserve bench report --plot`: latency histogram and throughput over time, in one PNG (needs matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from zmserve.bench.errors import BenchError
from zmserve.bench.records import Record
from zmserve.bench.summary import percentiles


def plot(records: Sequence[Record], path: str) -> None:
    """Latency histogram (successful requests) and sends/answers per time bin."""
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'zmserve[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise BenchError("nothing to plot: no records")
    sends = np.array([r.send_time for r in records], dtype=np.float64)
    sends -= sends.min()
    ends = sends + np.array([r.latency_ms for r in records], dtype=np.float64) / 1000.0
    latencies = [r.latency_ms for r in records if r.ok]
    width = max(0.1, float(ends.max()) / 20)
    edges = np.arange(0.0, float(ends.max()) + width, width)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if latencies:
        left.hist(latencies, bins=min(60, max(10, int(math.sqrt(len(latencies))))), color="tab:blue")
        marks = percentiles(latencies)
        for key in ("p50", "p99"):
            left.axvline(marks[key], color="tab:red", linestyle="--", linewidth=1)
            left.annotate(key, (marks[key], 1), xycoords=("data", "axes fraction"), xytext=(2, -12),
                          textcoords="offset points", color="tab:red")
    left.set(title=f"latency of {len(latencies)} OK requests", xlabel="ms", ylabel="requests")
    sent, _ = np.histogram(sends, edges)
    answered, _ = np.histogram(ends, edges)
    right.step(edges[:-1], sent / width, where="post", label="sent")
    right.step(edges[:-1], answered / width, where="post", label="answered")
    right.set(title="throughput over time", xlabel="s since first send", ylabel="req/s")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
