"""What the broker answers a STATUS_QUERY with, and the gauges it shows Prometheus: both read from its state.

The broker learns everything here from its workers' WORKER_STATUS (sent every heartbeat interval: state, agents,
requests held) and from the requests it routes itself (`BrokerMetrics.traffic`: the last minutes of each
servable). Nothing here changes the broker; `compose_status` runs on the broker's loop when a query arrives, and
`broker_gauges` on the metrics endpoint's thread when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from zmserve.metrics import GaugeSample, TrafficWindow
from zmserve.protocol import RequestId, Status, Traffic, TrafficPoint, WorkerInfo

if TYPE_CHECKING:
    from zmserve_services.broker.broker import Broker, WorkerRecord

WINDOW_S = 60.0
"""`zmserve status` shows each servable's requests, errors and p50/p99 over this last stretch."""
SERIES_STEP_S = 5
SERIES_SPAN_S = 300
"""The status page's chart: one point per 5 s over the last 5 minutes."""


def compose_status(broker: Broker, query_id: RequestId, now: float) -> Status:
    """Everything the broker knows: what is served, every worker with its agents, every servable's traffic."""
    metadata = broker.metadata(None)
    workers = sorted((worker_info(record, now) for record in broker.workers.values()),
                     key=lambda w: (w.servable, w.version, w.address))
    names = sorted({info.servable for info in metadata.servables} | set(broker.metrics.traffic))
    traffic = [servable_traffic(name, broker.metrics.window(name), now) for name in names]
    return Status(id=query_id, uptime_s=round(now - broker.started_at, 3), in_flight=len(broker.requests),
                  servables=metadata.servables, lost=metadata.lost, workers=workers, traffic=traffic)


def worker_info(record: WorkerRecord, now: float) -> WorkerInfo:
    status = record.status
    return WorkerInfo(
        servable=record.servable, version=record.version, ready=record.ready, reason=record.reason,
        state=status.state if status else "", address=status.address if status else "",
        host=status.host if status else "", pid=status.pid if status else 0,
        methods=list(record.declared_methods or sorted(record.methods)), agents=status.agents if status else [],
        requests=status.requests if status else 0, queued=status.queued if status else 0,
        calls_in_flight=status.calls_in_flight if status else 0, in_flight=len(record.inflight),
        status_age=round(now - record.liveness.last_heard, 3))


def servable_traffic(servable: str, window: TrafficWindow, now: float) -> Traffic:
    last = window.summary(now, WINDOW_S)
    series = [TrafficPoint(round(start, 3), point.requests, point.errors, milliseconds(point.p50),
                           milliseconds(point.p99))
              for start, point in window.series(now, SERIES_STEP_S, SERIES_SPAN_S)]
    return Traffic(servable=servable, window_s=WINDOW_S, requests=last.requests, errors=last.errors,
                   p50_ms=milliseconds(last.p50), p99_ms=milliseconds(last.p99), step_s=SERIES_STEP_S,
                   series=series)


def milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def broker_gauges(broker: Broker) -> Iterable[GaugeSample]:
    """Requests in flight and workers, per servable (and version, and readiness, for workers)."""
    in_flight: dict[str, int] = {}
    workers: dict[tuple[str, int, bool], int] = {}
    for record in list(broker.workers.values()):
        in_flight[record.servable] = in_flight.get(record.servable, 0) + len(record.inflight)
        key = (record.servable, record.version, record.ready)
        workers[key] = workers.get(key, 0) + 1
    for servable, count in sorted(in_flight.items()):
        yield ("zmserve_broker_requests_in_flight", "Requests handed to workers and not answered yet",
               {"servable": servable}, count)
    for (servable, version, ready), count in sorted(workers.items()):
        yield ("zmserve_broker_workers", "Workers registered, by readiness",
               {"servable": servable, "version": str(version), "ready": str(ready).lower()}, count)
