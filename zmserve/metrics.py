"""Prometheus metrics of the long-running zmserve processes: every metric's definition, the endpoint that serves
them, and the few calls a service makes per request.

Each role (broker, worker, gateway) has its own registry; a process serves the registries of the roles it runs
plus the process collector (CPU, memory, open FDs), so `zmserve serve` (broker and worker in one process) shows
both sets on one endpoint. A service holds one recorder (`BrokerMetrics`, `WorkerMetrics`, `GatewayMetrics`) and
calls it where a request ends, a model call leaves or returns, an agent restarts. Why the recorders look the
way they do:

  - per request they do a dict lookup and two or three `inc`/`observe` calls on label children found once and
    kept (`RequestSeries`): a `labels(...)` call costs more than the observation itself;
  - the gauges (queued, in flight, agents ready) are read from the service's own state when Prometheus scrapes
    (`LiveGauges`), so they cost nothing per request;
  - label values come from what is served, never straight from a client: a request answered NOT_FOUND is counted
    with empty servable and method labels, so a client naming random servables cannot grow the series;
  - `--metrics-bind off` makes a recorder that skips Prometheus (`enabled=False`); the broker's `TrafficWindow`
    (the last minutes of requests behind `zmserve status` and the status page) is kept either way.

The metric names and labels are listed in README.md ("Seeing it run"); the default ports are the CLI's
(`zmserve.cli`: broker and `zmserve serve` 9500, worker 9501, gateway 9502, on 127.0.0.1).
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from zmserve.endpoints import endpoint_host_port
from zmserve.protocol import ErrorCode

OK = "OK"
"""The `code` label of a request answered with its result (the others are ErrorCode names)."""

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FORMATION_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

REQUEST_LABELS = ("servable", "method", "version")

# ---- definitions --------------------------------------------------------------------------------------------
BROKER = CollectorRegistry()
broker_requests = Counter("zmserve_broker_requests", "Client requests answered by the broker, by servable, "
                          "method, version (the worker's) and code (OK or the error code)",
                          [*REQUEST_LABELS, "code"], registry=BROKER)
broker_request_seconds = Histogram("zmserve_broker_request_duration_seconds", "From a request's arrival at the "
                                   "broker to its answer, for requests routed to a worker",
                                   REQUEST_LABELS, buckets=LATENCY_BUCKETS, registry=BROKER)
broker_received_bytes = Counter("zmserve_broker_received_bytes", "Bytes of client messages received (header and "
                                "value frames)", registry=BROKER)
broker_sent_bytes = Counter("zmserve_broker_sent_bytes", "Bytes of answers sent to clients", registry=BROKER)

WORKER = CollectorRegistry()
worker_requests = Counter("zmserve_worker_requests", "Requests answered by the worker, by code",
                          [*REQUEST_LABELS, "code"], registry=WORKER)
worker_request_seconds = Histogram("zmserve_worker_request_duration_seconds", "From a request's arrival at the "
                                   "worker to its answer", REQUEST_LABELS, buckets=LATENCY_BUCKETS, registry=WORKER)
worker_stage_seconds = Histogram("zmserve_worker_stage_duration_seconds", "One Python stage of a method, over all "
                                 "instances of a request", [*REQUEST_LABELS, "stage"], buckets=LATENCY_BUCKETS,
                                 registry=WORKER)
worker_queue_seconds = Histogram("zmserve_worker_queue_duration_seconds", "From a request reaching the model stage "
                                 "to the model call that carries it being published (batching delay and waiting "
                                 "for room in the pipeline); one observation per model call, its oldest row",
                                 ["servable", "version"], buckets=LATENCY_BUCKETS, registry=WORKER)
worker_model_seconds = Histogram("zmserve_worker_model_duration_seconds", "From a model call's publish to stage 0 "
                                 "to its result from the last stage (every stage, and the wait behind calls ahead "
                                 "of it)", ["servable", "version"], buckets=LATENCY_BUCKETS, registry=WORKER)
worker_batch_size = Histogram("zmserve_worker_batch_size", "Instances per model call", ["servable", "version"],
                              buckets=BATCH_BUCKETS, registry=WORKER)
worker_model_sent_bytes = Counter("zmserve_worker_model_sent_bytes", "Bytes of model calls published to stage 0",
                                  ["servable", "version"], registry=WORKER)
worker_model_received_bytes = Counter("zmserve_worker_model_received_bytes", "Bytes of model results and errors "
                                      "received from the agents", ["servable", "version"], registry=WORKER)
worker_agent_restarts = Counter("zmserve_worker_agent_restarts", "New processes that registered for a rank after "
                                "its first one", ["servable", "version", "rank"], registry=WORKER)
worker_group_restarts = Counter("zmserve_worker_group_restarts", "Times every agent was told to restart (a lost "
                                "agent, a failed one, an execution or forming timeout)", ["servable", "version"],
                                registry=WORKER)
worker_group_formation_seconds = Histogram("zmserve_worker_group_formation_duration_seconds", "From every rank "
                                           "registered to serving: joining the groups, loading, warming up",
                                           ["servable", "version"], buckets=FORMATION_BUCKETS, registry=WORKER)
worker_ttft_seconds = Histogram("zmserve_worker_time_to_first_token_seconds", "Generation: from a request's arrival "
                                "at the worker to the result of its first stateful model call (its first token)",
                                ["servable", "version"], registry=WORKER,
                                buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
worker_inter_token_seconds = Histogram("zmserve_worker_inter_token_seconds", "Generation: between two tokens of one "
                                       "sequence (its consecutive decode-step results)", ["servable", "version"],
                                       registry=WORKER,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
worker_generated_tokens = Counter("zmserve_worker_generated_tokens", "Generation: tokens made (one per sequence "
                                  "per stateful step result)", ["servable", "version"], registry=WORKER)
worker_step_rows = Histogram("zmserve_worker_step_sequences", "Generation: sequences in one decode step (the "
                             "continuous batch)", ["servable", "version"], registry=WORKER,
                             buckets=(1, 2, 4, 8, 16, 32, 64, 128))

GATEWAY = CollectorRegistry()
gateway_http_requests = Counter("zmserve_gateway_http_requests", "HTTP requests answered, by route (ms_rest, oip, "
                                "status, other) and HTTP status", ["route", "status"], registry=GATEWAY)
gateway_http_seconds = Histogram("zmserve_gateway_http_request_duration_seconds", "From an HTTP request's start to "
                                 "its response", ["route"], buckets=LATENCY_BUCKETS, registry=GATEWAY)
gateway_requests = Counter("zmserve_gateway_requests", "Broker requests made for HTTP requests (one per instance), "
                           "by servable, method, version as asked (0 = newest) and code",
                           [*REQUEST_LABELS, "code"], registry=GATEWAY)
gateway_request_seconds = Histogram("zmserve_gateway_request_duration_seconds", "One broker request, from send to "
                                    "answer", REQUEST_LABELS, buckets=LATENCY_BUCKETS, registry=GATEWAY)
gateway_received_bytes = Counter("zmserve_gateway_received_bytes", "Bytes of HTTP request bodies",
                                 registry=GATEWAY)
gateway_sent_bytes = Counter("zmserve_gateway_sent_bytes", "Bytes of HTTP response bodies", registry=GATEWAY)


# ---- live gauges, read at scrape time -----------------------------------------------------------------------
GaugeSample = tuple[str, str, dict[str, str], float]
"""(metric name, help, labels, value) of one gauge sample."""


class LiveGauges:
    """A collector asking live services for their gauges when Prometheus scrapes. Recorders are held weakly, so a
    stopped service drops out; samples of several services with the same name become one family."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sources: list[weakref.ref] = []
        self.lock = threading.Lock()
        registry.register(self)

    def add(self, recorder: Any) -> None:
        """`recorder.live_gauges()` gives its service's samples."""
        with self.lock:
            self.sources.append(weakref.ref(recorder))

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            recorders = [ref() for ref in self.sources]
            self.sources = [ref for ref, alive in zip(self.sources, recorders, strict=True) if alive is not None]
        families: dict[str, GaugeMetricFamily] = {}
        for recorder in recorders:
            if recorder is None:
                continue
            for name, help_text, labels, value in read_gauges(recorder.live_gauges):
                family = families.get(name)
                if family is None:
                    family = families[name] = GaugeMetricFamily(name, help_text, labels=list(labels))
                family.add_metric(list(labels.values()), value)
        yield from families.values()

    def describe(self) -> list[Metric]:
        return []  # the names depend on the services attached; nothing to check at registration


def read_gauges(source: Callable[[], Iterable[GaugeSample]]) -> list[GaugeSample]:
    """A service's gauges, read from another thread than its loop's: a dict it resizes meanwhile makes the read
    fail, and the next try (or the next scrape) sees a consistent one."""
    for _ in range(3):
        try:
            return list(source())
        except RuntimeError:
            continue
    return []


def no_gauges() -> list[GaugeSample]:
    return []


BROKER_GAUGES = LiveGauges(BROKER)
WORKER_GAUGES = LiveGauges(WORKER)
GATEWAY_GAUGES = LiveGauges(GATEWAY)


# ---- the endpoint -------------------------------------------------------------------------------------------
def parse_bind(text: str) -> tuple[str, int] | None:
    """`--metrics-bind`: host:port (port 0 = any free port), or `off` (None)."""
    if text.strip().lower() == "off":
        return None
    return endpoint_host_port(text)


class MetricsEndpoint:
    """An HTTP server (prometheus_client's, on a daemon thread) answering GET /metrics with these registries and
    the process's own CPU, memory and file descriptors."""

    def __init__(self, host: str, port: int, registries: Iterable[CollectorRegistry]) -> None:
        self.registry = CollectorRegistry()
        for registry in registries:
            self.registry.register(registry)
        ProcessCollector(registry=self.registry)
        self.server, self.thread = start_http_server(port, host, registry=self.registry)
        self.address = f"{host}:{self.server.server_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# ---- the window behind `zmserve status` -----------------------------------------------------------------------
BUCKETS_PER_E = 20
"""Latencies are kept in log buckets of ratio e^(1/20) (5 %): percentiles of any number of requests in a fixed
amount of memory."""
MIN_LATENCY_S = 1e-6


def latency_bucket(seconds: float) -> int:
    return math.floor(math.log(max(seconds, MIN_LATENCY_S)) * BUCKETS_PER_E)


def bucket_value(bucket: int) -> float:
    """The geometric middle of a bucket: within 2.5 % of every latency in it."""
    return math.exp((bucket + 0.5) / BUCKETS_PER_E)


@dataclass
class Second:
    """The requests that ended within one second: how many, how many failed, their latencies by bucket."""

    at: int
    requests: int = 0
    errors: int = 0
    latencies: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TrafficSummary:
    requests: int
    errors: int
    p50: float | None
    p99: float | None


class TrafficWindow:
    """The last `span` seconds of one servable's requests, as the broker saw them end, second by second."""

    def __init__(self, span: int = 300) -> None:
        self.span = span
        self.seconds: deque[Second] = deque()

    def add(self, now: float, seconds: float | None, ok: bool) -> None:
        """A request ended at `now` after `seconds` (None: refused at once, it has no latency)."""
        at = int(now)
        if not self.seconds or self.seconds[-1].at != at:
            self.seconds.append(Second(at))
            while self.seconds[0].at <= at - self.span:
                self.seconds.popleft()
        second = self.seconds[-1]
        second.requests += 1
        if not ok:
            second.errors += 1
        if seconds is not None:
            bucket = latency_bucket(seconds)
            second.latencies[bucket] = second.latencies.get(bucket, 0) + 1

    def summary(self, now: float, last: float = 60.0) -> TrafficSummary:
        """Requests, errors and latency percentiles of the last `last` seconds."""
        return summarize([s for s in self.seconds if s.at > now - last])

    def series(self, now: float, step: int = 5, span: int | None = None) -> list[tuple[float, TrafficSummary]]:
        """One summary per `step` seconds over the last `span`, oldest first, each with its start in seconds
        before `now` (negative): what the status page draws."""
        span = span or self.span
        end = int(now) + 1
        points = []
        for start in range(end - span, end, step):
            points.append((start - now, summarize([s for s in self.seconds if start <= s.at < start + step])))
        return points


def summarize(seconds: list[Second]) -> TrafficSummary:
    counts: dict[int, int] = {}
    for second in seconds:
        for bucket, count in second.latencies.items():
            counts[bucket] = counts.get(bucket, 0) + count
    return TrafficSummary(sum(s.requests for s in seconds), sum(s.errors for s in seconds),
                          percentile(counts, 0.50), percentile(counts, 0.99))


def percentile(counts: dict[int, int], fraction: float) -> float | None:
    """The latency below which `fraction` of the counted requests fall (nearest rank, bucket middle)."""
    total = sum(counts.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= rank:
            return bucket_value(bucket)
    raise AssertionError("unreachable: the counts add up to total")


# ---- recorders ----------------------------------------------------------------------------------------------
def frames_size(frames: list[Any]) -> int:
    """Bytes of frames as they are sent: zmq.Frame and bytes (their length) or numpy arrays and memoryviews
    (`nbytes`: an array's len() is its first dimension)."""
    size = 0
    for frame in frames:
        nbytes = getattr(frame, "nbytes", None)
        size += nbytes if nbytes is not None else len(frame)
    return size


@dataclass(eq=False)
class RequestSeries:
    """The children of one (servable, method, version), found once: a request's end is a dict lookup away."""

    labels: tuple[str, str, str]
    counter: Counter
    latency: Any
    """The histogram child (None when recording is off)."""
    window: TrafficWindow | None = None
    by_code: dict[str, Any] = field(default_factory=dict)

    def count(self, code: str) -> None:
        child = self.by_code.get(code)
        if child is None:
            child = self.by_code[code] = self.counter.labels(*self.labels, code)
        child.inc()


def answered_labels(servable: str, method: str, code: str) -> tuple[str, str]:
    """Labels for what a client named: nothing of it when it named what is not served (NOT_FOUND)."""
    return ("", "") if code == ErrorCode.NOT_FOUND else (servable, method)


class BrokerMetrics:
    """The broker's hooks: bytes in (`received`) and out (`sent`), a routed request's end (`finished`), a request
    refused before routing (`rejected`); in-flight requests and workers are read at scrape time (`gauges`)."""

    def __init__(self, enabled: bool, gauges: Callable[[], Iterable[GaugeSample]] | None = None) -> None:
        self.enabled = enabled
        self.series_by_key: dict[tuple[str, str, int], RequestSeries] = {}
        self.traffic: dict[str, TrafficWindow] = {}
        """Per servable: the requests of the last minutes (kept with recording off too: `zmserve status`)."""
        self.live_gauges = gauges or no_gauges
        if enabled:
            BROKER_GAUGES.add(self)

    def series(self, servable: str, method: str, version: int) -> RequestSeries:
        key = (servable, method, version)
        series = self.series_by_key.get(key)
        if series is None:
            labels = (servable, method, str(version))
            series = self.series_by_key[key] = RequestSeries(
                labels, broker_requests, broker_request_seconds.labels(*labels) if self.enabled else None,
                self.window(servable))
        return series

    def window(self, servable: str) -> TrafficWindow:
        window = self.traffic.get(servable)
        if window is None:
            window = self.traffic[servable] = TrafficWindow()
        return window

    def received(self, size: int) -> None:
        if self.enabled:
            broker_received_bytes.inc(size)

    def sent(self, frames: list[Any]) -> None:
        if self.enabled:
            broker_sent_bytes.inc(frames_size(frames))

    def finished(self, series: RequestSeries, code: str, arrived: float, now: float) -> None:
        """A routed request was answered (its reply, or the broker's error for it) at `now`."""
        seconds = now - arrived
        assert series.window is not None
        series.window.add(now, seconds, code == OK)
        if self.enabled:
            series.count(code)
            series.latency.observe(seconds)

    def rejected(self, servable: str | None, method: str | None, code: str, known: bool, now: float) -> None:
        """A request answered with an error before any worker had it; `known`: the servable is one some worker
        served (only then is it a label, and in the window)."""
        if known and servable is not None:
            self.window(servable).add(now, None, False)
        if self.enabled:
            named = answered_labels(servable or "", method or "", code) if known else ("", "")
            broker_requests.labels(*named, "", code).inc()


class WorkerMetrics:
    """The worker's hooks: a request refused or answered, a Python stage run, a model call published or returned,
    an agent restarted, the groups restarted or formed; requests held, calls queued and in flight and agents
    ready are read at scrape time (`gauges`)."""

    def __init__(self, servable: str, version: int, enabled: bool,
                 gauges: Callable[[], Iterable[GaugeSample]] | None = None) -> None:
        self.enabled = enabled
        self.servable, self.version = servable, str(version)
        self.by_method: dict[str, RequestSeries] = {}
        self.stages: dict[tuple[str, str], Any] = {}
        if enabled:
            labels = (self.servable, self.version)
            self.queue = worker_queue_seconds.labels(*labels)
            self.model = worker_model_seconds.labels(*labels)
            self.batch = worker_batch_size.labels(*labels)
            self.sent_bytes = worker_model_sent_bytes.labels(*labels)
            self.received_bytes = worker_model_received_bytes.labels(*labels)
        self.live_gauges = gauges or no_gauges
        if enabled:
            WORKER_GAUGES.add(self)

    def series(self, method: str) -> RequestSeries:
        series = self.by_method.get(method)
        if series is None:
            labels = (self.servable, method, self.version)
            series = self.by_method[method] = RequestSeries(labels, worker_requests,
                                                            worker_request_seconds.labels(*labels))
        return series

    def rejected(self, method: str | None, code: str) -> None:
        if self.enabled:
            _, named = answered_labels(self.servable, method or "", code)
            worker_requests.labels(self.servable, named, self.version, code).inc()

    def request_done(self, method: str, code: str, started: float) -> None:
        if self.enabled:
            series = self.series(method)
            series.count(code)
            series.latency.observe(time.perf_counter() - started)

    def stage_ran(self, method: str, stage: str, started: float) -> None:
        if self.enabled:
            child = self.stages.get((method, stage))
            if child is None:
                child = self.stages[method, stage] = worker_stage_seconds.labels(self.servable, method,
                                                                                 self.version, stage)
            child.observe(time.perf_counter() - started)

    def call_published(self, queued_since: float, rows: int, frames: list[Any]) -> float:
        """A model call left for stage 0; returns the time to give `call_returned`."""
        now = time.perf_counter()
        if self.enabled:
            self.queue.observe(now - queued_since)
            self.batch.observe(rows)
            self.sent_bytes.inc(frames_size(frames))
        return now

    def call_returned(self, published: float, frames: list[Any]) -> None:
        if self.enabled:
            self.model.observe(time.perf_counter() - published)
            self.received_bytes.inc(frames_size(frames))

    def agent_restarted(self, rank: int) -> None:
        if self.enabled:
            worker_agent_restarts.labels(self.servable, self.version, str(rank)).inc()

    def groups_restarted(self) -> None:
        if self.enabled:
            worker_group_restarts.labels(self.servable, self.version).inc()

    def groups_formed(self, seconds: float) -> None:
        if self.enabled:
            worker_group_formation_seconds.labels(self.servable, self.version).observe(seconds)

    def first_token(self, seconds: float) -> None:
        if self.enabled:
            worker_ttft_seconds.labels(self.servable, self.version).observe(seconds)
            worker_generated_tokens.labels(self.servable, self.version).inc()

    def inter_token(self, seconds: float) -> None:
        if self.enabled:
            worker_inter_token_seconds.labels(self.servable, self.version).observe(seconds)
            worker_generated_tokens.labels(self.servable, self.version).inc()

    def decode_step(self, sequences: int) -> None:
        if self.enabled:
            worker_step_rows.labels(self.servable, self.version).observe(sequences)


class GatewayMetrics:
    """The gateway's hooks: an HTTP request answered (`http_request`), its body read (`received`), one broker
    request answered (`broker_request`); broker requests awaiting an answer are read at scrape time."""

    def __init__(self, enabled: bool, gauges: Callable[[], Iterable[GaugeSample]] | None = None) -> None:
        self.enabled = enabled
        self.by_key: dict[tuple[str, str, int], RequestSeries] = {}
        self.live_gauges = gauges or no_gauges
        if enabled:
            GATEWAY_GAUGES.add(self)

    def received(self, size: int) -> None:
        if self.enabled:
            gateway_received_bytes.inc(size)

    def http_request(self, route: str, status: int, started: float, body_size: int) -> None:
        if self.enabled:
            gateway_http_requests.labels(route, str(status)).inc()
            gateway_http_seconds.labels(route).observe(time.perf_counter() - started)
            gateway_sent_bytes.inc(body_size)

    def broker_request(self, servable: str, method: str, version: int, code: str, started: float) -> None:
        if not self.enabled:
            return
        if code == ErrorCode.NOT_FOUND:
            gateway_requests.labels("", "", "", code).inc()
            return
        key = (servable, method, version)
        series = self.by_key.get(key)
        if series is None:
            labels = (servable, method, str(version))
            series = self.by_key[key] = RequestSeries(labels, gateway_requests,
                                                      gateway_request_seconds.labels(*labels))
        series.count(code)
        series.latency.observe(time.perf_counter() - started)
