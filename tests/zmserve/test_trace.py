"""Per-request timelines (zmserve/trace.py): the stamp arithmetic, and a traced request through a real cluster
(broker, worker and agent processes, MindSpore) coming back with every hop stamped in order."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import Cluster, Exports, matmul_reference, start_matmul_cluster
from zmserve import trace as tracing
from zmserve.client import Client
from zmserve.protocol import Reply, decode, encode

HOPS = [tracing.CLIENT_SEND, tracing.BROKER_IN, tracing.BROKER_OUT, tracing.WORKER_IN, tracing.WORKER_OUT,
        tracing.AGENT_IN, tracing.MODEL_START, tracing.MODEL_END, tracing.AGENT_OUT, tracing.WORKER_RESULT,
        tracing.WORKER_REPLY, tracing.BROKER_IN, tracing.BROKER_OUT, tracing.CLIENT_RECEIVE]
"""A request's whole path through a broker, a worker and one agent, and back."""


def test_spans_are_the_gaps_between_consecutive_stamps_and_repeated_hops_are_numbered() -> None:
    stamps = [("a", 1_000), ("b", 3_500), ("a", 4_000), ("b", 10_000)]
    assert tracing.spans(stamps) == {"a>b": 2.5, "b>a": 0.5, "a>b#2": 6.0}
    assert tracing.spans([("a", 5)]) == {}


def test_an_untraced_request_carries_nothing_and_gets_nothing() -> None:
    assert tracing.start(False) is None
    tracing.stamp(None, tracing.BROKER_IN)  # no error, nothing to stamp
    target: list = []
    tracing.finish(target, None)
    assert target == []
    tracing.finish(None, [("x", 1)])


def test_restamp_appends_the_hop_and_reencodes_only_the_header() -> None:
    reply = Reply(id=7, trace=[(tracing.CLIENT_SEND, 1)])
    frames = tracing.restamp(reply, [encode(reply), b"values"], tracing.BROKER_OUT)
    assert frames[1] == b"values"
    decoded = decode(frames[0], Reply)
    assert [hop for hop, _ in decoded.trace] == [tracing.CLIENT_SEND, tracing.BROKER_OUT]
    assert decoded.trace[1][1] >= 1


def test_span_summary_gives_count_median_and_p90_per_span() -> None:
    summary = tracing.span_summary([{"a>b": float(v)} for v in range(1, 11)])
    assert summary == {"a>b": {"n": 10, "p50_us": 6.0, "p90_us": 10.0}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> Iterator[Cluster]:
    started = start_matmul_cluster(tmp_path_factory.mktemp("trace"), exports, 1)
    yield started
    started.stop()


@pytest.mark.slow
def test_a_traced_request_comes_back_stamped_at_every_hop_in_order(cluster: Cluster) -> None:
    x = np.random.default_rng(0).standard_normal((128, 96)).astype(np.float32)
    with Client(cluster.client_address, "matmul", "predict") as client:
        for call in (client.infer, lambda *a, **k: client.infer_async(*a, **k).result(30)):
            stamps: list = []
            result = call({"x": x}, 30, trace=stamps)
            np.testing.assert_allclose(result[0]["y"], matmul_reference(x), rtol=1e-5, atol=1e-4)
            assert [hop for hop, _ in stamps] == HOPS
            times = [at for _, at in stamps]
            assert times == sorted(times), stamps  # one host, one monotonic clock
            spans = tracing.spans(stamps)
            assert 0 < spans["model_start>model_end"] < sum(spans.values())


@pytest.mark.slow
def test_bench_run_trace_writes_spans_on_every_nth_record(cluster: Cluster) -> None:
    zmserve = str(Path(sys.executable).parent / "zmserve")
    done = subprocess.run([zmserve, "bench", "run", "--address", cluster.client_address, "--servable", "matmul",
                           "--shape", "128x96", "--requests", "12", "--trace", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 12
    traced = {record["id"] for record in records if "spans" in record}
    assert traced == {record["id"] for record in records if record["id"] % 3 == 0}
    for record in records:
        if "spans" in record:
            assert sum(record["spans"].values()) <= record["latency_ms"] * 1000
    summary = json.loads(next(line for line in done.stderr.splitlines() if line.startswith('{"traced"')))
    assert summary["traced"] == len(traced) and "model_start>model_end" in summary["spans"]
