"""zmserve.metrics without any service: the recorders against what prometheus_client's parser reads back from the
exposition, the label rules, the live gauges, the endpoint over HTTP, and the traffic window's percentiles."""

from __future__ import annotations

import gc
import socket
import urllib.request
import uuid

import click
import numpy as np
import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from zmserve import metrics
from zmserve.cli import metrics_endpoint, metrics_option, records_metrics
from zmserve.metrics import (
    OK,
    BrokerMetrics,
    GatewayMetrics,
    MetricsEndpoint,
    TrafficWindow,
    WorkerMetrics,
    parse_bind,
    percentile,
)
from zmserve.transport import free_port


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(registry) -> dict[tuple[str, frozenset], float]:
    return samples(generate_latest(registry).decode())


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def unique(prefix: str) -> str:
    """The registries are per process: each test counts its own servable."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---- recorders --------------------------------------------------------------------------------------------------
def test_broker_counts_requests_by_code_with_their_latency() -> None:
    servable = unique("broker")
    recorder = BrokerMetrics(enabled=True)
    series = recorder.series(servable, "predict", 3)
    recorder.finished(series, OK, arrived=10.0, now=10.002)
    recorder.finished(series, OK, arrived=10.0, now=10.004)
    recorder.finished(series, "DEADLINE_EXCEEDED", arrived=10.0, now=12.0)
    found = scrape(metrics.BROKER)
    labels = {"servable": servable, "method": "predict", "version": "3"}
    assert value(found, "zmserve_broker_requests_total", **labels, code="OK") == 2
    assert value(found, "zmserve_broker_requests_total", **labels, code="DEADLINE_EXCEEDED") == 1
    assert value(found, "zmserve_broker_request_duration_seconds_count", **labels) == 3
    assert value(found, "zmserve_broker_request_duration_seconds_sum", **labels) == pytest.approx(2.006)
    assert value(found, "zmserve_broker_request_duration_seconds_bucket", **labels, le="0.0025") == 1
    assert value(found, "zmserve_broker_request_duration_seconds_bucket", **labels, le="0.005") == 2


def test_broker_bytes_in_and_out() -> None:
    recorder = BrokerMetrics(enabled=True)
    before = scrape(metrics.BROKER)
    recorder.received(1000)
    recorder.sent([b"abc", b"x" * 97])
    after = scrape(metrics.BROKER)
    assert after["zmserve_broker_received_bytes_total", frozenset()] \
        - before["zmserve_broker_received_bytes_total", frozenset()] == 1000
    assert after["zmserve_broker_sent_bytes_total", frozenset()] \
        - before["zmserve_broker_sent_bytes_total", frozenset()] == 100


def test_refused_requests_name_only_what_is_served() -> None:
    known, unknown = unique("known"), unique("nosuch")
    recorder = BrokerMetrics(enabled=True)
    recorder.rejected(known, "predict", "UNAVAILABLE", known=True, now=5.0)
    recorder.rejected(known, "train", "NOT_FOUND", known=True, now=5.0)
    recorder.rejected(unknown, "predict", "NOT_FOUND", known=False, now=5.0)
    found = scrape(metrics.BROKER)
    assert value(found, "zmserve_broker_requests_total", servable=known, method="predict", version="",
                 code="UNAVAILABLE") == 1
    assert value(found, "zmserve_broker_requests_total", servable="", method="", version="", code="NOT_FOUND") >= 2
    assert not any(unknown in str(labels) or "train" in str(labels) for _, labels in found)
    assert recorder.traffic[known].summary(5.5).errors == 2  # refused requests of a served servable are errors
    assert unknown not in recorder.traffic


def test_recording_off_keeps_only_the_traffic_window() -> None:
    servable = unique("off")
    recorder = BrokerMetrics(enabled=False)
    recorder.finished(recorder.series(servable, "predict", 1), OK, arrived=1.0, now=1.5)
    recorder.rejected(servable, "predict", "UNAVAILABLE", known=True, now=1.5)
    recorder.received(10)
    assert not any(servable in str(labels) for _, labels in scrape(metrics.BROKER))
    summary = recorder.traffic[servable].summary(2.0)
    assert (summary.requests, summary.errors) == (2, 1)


def test_worker_hooks() -> None:
    servable = unique("worker")
    recorder = WorkerMetrics(servable, 2, enabled=True)
    recorder.rejected(None, "NOT_FOUND")
    recorder.rejected("predict", "UNAVAILABLE")
    recorder.request_done("predict", OK, started=0.0)
    recorder.stage_ran("predict", "preprocess", started=0.0)
    published = recorder.call_published(queued_since=0.0, rows=5, frames=[np.zeros((4, 5), np.float32), b"v" * 20])
    recorder.call_returned(published, [b"r" * 40])
    recorder.agent_restarted(3)
    recorder.groups_restarted()
    recorder.groups_formed(4.5)
    found = scrape(metrics.WORKER)
    base = {"servable": servable, "version": "2"}
    assert value(found, "zmserve_worker_requests_total", **base, method="", code="NOT_FOUND") == 1
    assert value(found, "zmserve_worker_requests_total", **base, method="predict", code="UNAVAILABLE") == 1
    assert value(found, "zmserve_worker_requests_total", **base, method="predict", code="OK") == 1
    assert value(found, "zmserve_worker_request_duration_seconds_count", **base, method="predict") == 1
    assert value(found, "zmserve_worker_stage_duration_seconds_count", **base, method="predict",
                 stage="preprocess") == 1
    assert value(found, "zmserve_worker_queue_duration_seconds_count", **base) == 1
    assert value(found, "zmserve_worker_model_duration_seconds_count", **base) == 1
    assert value(found, "zmserve_worker_batch_size_sum", **base) == 5
    assert value(found, "zmserve_worker_model_sent_bytes_total", **base) == 100
    assert value(found, "zmserve_worker_model_received_bytes_total", **base) == 40
    assert value(found, "zmserve_worker_agent_restarts_total", **base, rank="3") == 1
    assert value(found, "zmserve_worker_group_restarts_total", **base) == 1
    assert value(found, "zmserve_worker_group_formation_duration_seconds_sum", **base) == 4.5


def test_gateway_hooks_and_not_found_labels() -> None:
    servable = unique("gw")
    recorder = GatewayMetrics(enabled=True)
    recorder.broker_request(servable, "predict", 0, OK, started=0.0)
    recorder.broker_request(unique("nosuch"), "predict", 0, "NOT_FOUND", started=0.0)
    recorder.http_request("ms_rest", 200, started=0.0, body_size=321)
    found = scrape(metrics.GATEWAY)
    assert value(found, "zmserve_gateway_requests_total", servable=servable, method="predict", version="0",
                 code="OK") == 1
    assert value(found, "zmserve_gateway_requests_total", servable="", method="", version="", code="NOT_FOUND") >= 1
    assert value(found, "zmserve_gateway_http_requests_total", route="ms_rest", status="200") >= 1
    assert not any("nosuch" in str(labels) for _, labels in found)


def test_live_gauges_are_read_at_scrape_time_and_leave_with_their_service() -> None:
    servable = unique("live")
    held = [3]
    recorder = WorkerMetrics(servable, 1, enabled=True, gauges=lambda: [
        ("zmserve_worker_requests_held", "held", {"servable": servable, "version": "1"}, held[0])])
    assert value(scrape(metrics.WORKER), "zmserve_worker_requests_held", servable=servable, version="1") == 3
    held[0] = 7
    assert value(scrape(metrics.WORKER), "zmserve_worker_requests_held", servable=servable, version="1") == 7
    del recorder
    gc.collect()
    assert value(scrape(metrics.WORKER), "zmserve_worker_requests_held", servable=servable, version="1") is None


def test_a_gauge_source_that_fails_while_its_service_changes_is_retried() -> None:
    servable = unique("flaky")
    calls = []

    def gauges():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("dictionary changed size during iteration")
        return [("zmserve_worker_requests_held", "held", {"servable": servable, "version": "1"}, 1)]

    recorder = WorkerMetrics(servable, 1, enabled=True, gauges=gauges)
    assert value(scrape(metrics.WORKER), "zmserve_worker_requests_held", servable=servable, version="1") == 1
    del recorder


# ---- the endpoint -----------------------------------------------------------------------------------------------
def test_endpoint_serves_its_registries_and_the_process_over_http() -> None:
    servable = unique("endpoint")
    recorder = BrokerMetrics(enabled=True)
    recorder.finished(recorder.series(servable, "m", 1), OK, 0.0, 0.001)
    endpoint = MetricsEndpoint("127.0.0.1", 0, [metrics.BROKER])
    try:
        with urllib.request.urlopen(endpoint.url, timeout=5) as response:
            found = samples(response.read().decode())
    finally:
        endpoint.close()
    assert value(found, "zmserve_broker_requests_total", servable=servable, method="m", version="1", code="OK") == 1
    assert ("process_cpu_seconds_total", frozenset()) in found
    assert not any(name.startswith("zmserve_worker_") for name, _ in found)


def test_parse_bind() -> None:
    assert parse_bind("off") is None and parse_bind(" OFF ") is None
    assert parse_bind("127.0.0.1:9500") == ("127.0.0.1", 9500)
    assert parse_bind("0.0.0.0:0") == ("0.0.0.0", 0)
    with pytest.raises(ValueError):
        parse_bind("9500")


# ---- the traffic window -----------------------------------------------------------------------------------------
def test_percentiles_are_within_the_bucket_resolution() -> None:
    rng = np.random.default_rng(1)
    latencies = rng.lognormal(mean=np.log(0.002), sigma=0.8, size=5000)
    window = TrafficWindow()
    for i, seconds in enumerate(latencies):
        window.add(100.0 + i * 0.01, float(seconds), ok=i % 50 != 0)
    summary = window.summary(now=150.0, last=60.0)
    assert (summary.requests, summary.errors) == (5000, 100)
    for fraction, found in ((0.50, summary.p50), (0.99, summary.p99)):
        exact = float(np.percentile(latencies, fraction * 100, method="inverted_cdf"))
        assert found == pytest.approx(exact, rel=0.06)


def test_window_keeps_only_its_span_and_summarises_the_last_minute() -> None:
    window = TrafficWindow(span=300)
    window.add(1000.2, 0.010, ok=True)
    window.add(1250.0, 0.020, ok=False)
    window.add(1299.0, None, ok=False)
    assert window.summary(now=1299.5, last=60).requests == 2
    assert window.summary(now=1299.5, last=60).p50 == pytest.approx(0.020, rel=0.03)  # a refusal has no latency
    assert window.summary(now=1299.5, last=600).requests == 3
    window.add(1301.0, 0.030, ok=True)  # second 1000 is now older than the span
    assert window.summary(now=1301.5, last=600).requests == 3
    assert percentile({}, 0.5) is None and window.summary(now=5000.0).p50 is None


def test_series_steps_cover_the_span_oldest_first() -> None:
    window = TrafficWindow(span=300)
    for i in range(10):
        window.add(2000.0 + i, 0.001, ok=True)  # seconds 2000..2009
    points = window.series(now=2009.5, step=5, span=300)
    assert len(points) == 60
    assert [start for start, _ in points] == sorted(start for start, _ in points)
    assert sum(point.requests for _, point in points) == 10
    assert points[-1][1].requests == 5 and points[-2][1].requests == 5 and points[-1][0] < 0


# ---- --metrics-bind in the CLI ----------------------------------------------------------------------------------
def probe_command(default: str):
    """A command with the CLI's --metrics-bind option that says whether its service would record, and whether the
    endpoint serves."""
    @click.command()
    @metrics_option(default)
    def probe(metrics_bind: str) -> None:
        recording = records_metrics(metrics_bind)
        with metrics_endpoint(metrics_bind, ["broker"]) as serving:
            click.echo(f"recording={recording} serving={serving}")

    return probe


def test_a_taken_default_port_is_a_warning_and_a_chosen_one_an_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = CliRunner().invoke(probe_command(address), [])
        assert result.exit_code == 0 and "recording=True serving=False" in result.stdout
        result = CliRunner().invoke(probe_command("127.0.0.1:9"), ["--metrics-bind", address])
        assert result.exit_code == 1 and f"cannot serve metrics on {address}" in result.output
    assert "recording=False serving=False" in CliRunner().invoke(probe_command(address),
                                                                 ["--metrics-bind", "off"]).stdout
    assert CliRunner().invoke(probe_command(address), ["--metrics-bind", "nonsense"]).exit_code == 2


def test_the_endpoint_lives_as_long_as_the_command() -> None:
    port = free_port()
    result = CliRunner().invoke(probe_command(f"127.0.0.1:{port}"), [])
    assert result.exit_code == 0 and "recording=True serving=True" in result.stdout
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # closed again when the command ended
