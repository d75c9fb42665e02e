"""`zmserve status`: ask the broker for its STATUS and show it, once or every interval.

The broker composes the answer (services/broker/status.py) from its workers' WORKER_STATUS and the requests it
routed; this module only asks (`query_status`, one DEALER, one message) and draws (`render`). `--json` prints
the answer as the broker sent it, in JSON.
"""

from __future__ import annotations

import itertools
import math
import sys
import time

import msgspec
import zmq

from zmserve.client import broker_endpoint
from zmserve.protocol import AgentStatus, Error, ServingError, Status, StatusQuery, WorkerInfo, decode, encode
from zmserve.security import CurveClient
from zmserve.transport import new_socket

CLEAR_SCREEN = "\x1b[H\x1b[2J"


class StatusUnavailable(RuntimeError):
    """The broker did not answer, or answered with an error; the message is one line for the user."""


class StatusClient:
    """One DEALER to the broker's client address, asking STATUS_QUERY and waiting for the answer with its id."""

    def __init__(self, address: str, context: zmq.Context | None = None, curve: CurveClient | None = None) -> None:
        self.address = broker_endpoint(address)
        self.socket = new_socket(context or zmq.Context.instance(), zmq.DEALER, curve=curve)
        self.socket.connect(self.address)
        self.ids = itertools.count(1)

    def query(self, timeout: float) -> Status:
        request_id = next(self.ids)
        self.socket.send(encode(StatusQuery(id=request_id)))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.socket.poll(math.ceil(remaining * 1000)):
                raise StatusUnavailable(f"no answer from the broker at {self.address} within {timeout:g} s "
                                        "(is it running? --broker is its client address; a broker with CURVE "
                                        "needs --secret-key and --broker-key)")
            frames = self.socket.recv_multipart()
            try:
                answer = decode(frames[0], Status, Error)
            except ServingError as error:
                raise StatusUnavailable(f"the broker at {self.address} answered something unreadable: "
                                        f"{error.message}") from None
            if answer.id != request_id:
                continue  # the answer to an earlier query this client gave up on
            if isinstance(answer, Error):
                raise StatusUnavailable(f"the broker at {self.address} answered {answer.code}: {answer.message}")
            return answer

    def close(self) -> None:
        self.socket.close()


def query_status(address: str, timeout: float = 3.0, curve: CurveClient | None = None) -> Status:
    client = StatusClient(address, curve=curve)
    try:
        return client.query(timeout)
    finally:
        client.close()


def watch_status(address: str, as_json: bool, watch: bool, interval: float, timeout: float,
                 curve: CurveClient | None = None) -> None:
    """Print the status once, or every `interval` seconds until interrupted (Ctrl-C ends it quietly)."""
    client = StatusClient(address, curve=curve)
    try:
        while True:
            status = client.query(timeout)
            if as_json:
                print(msgspec.json.encode(status).decode(), flush=True)
            else:
                print((CLEAR_SCREEN if watch and sys.stdout.isatty() else "") + render(status, client.address),
                      flush=True)
            if not watch:
                return
            time.sleep(interval)  # the refresh period of a display, not a wait for a condition
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


# ---- drawing --------------------------------------------------------------------------------------------------
def render(status: Status, broker: str) -> str:
    """The status as text: a summary line, one row per servable, then each worker with its agents."""
    lines = [f"broker {broker}  up {duration(status.uptime_s)}  {status.in_flight} requests in flight", ""]
    traffic = {t.servable: t for t in status.traffic}
    rows = [["SERVABLE", "VERSION", "METHODS", "READY", "REQUESTS/60s", "ERRORS", "P50", "P99"]]
    for servable in status.servables:
        t = traffic.get(servable.servable)
        rows.append([servable.servable, str(servable.version), ",".join(servable.methods),
                     "yes" if servable.ready else "no", str(t.requests if t else 0), str(t.errors if t else 0),
                     milliseconds(t.p50_ms if t else None), milliseconds(t.p99_ms if t else None)])
    for name in status.lost:
        rows.append([name, "-", "-", "lost", "", "", "", ""])
    lines += table(rows) if len(rows) > 1 else ["no servable is registered"]
    for worker in status.workers:
        lines += ["", *render_worker(worker)]
    return "\n".join(lines)


def render_worker(worker: WorkerInfo) -> list[str]:
    readiness = "ready" if worker.ready else f"NOT READY: {worker.reason}"
    lines = [f"worker {worker.servable} v{worker.version} at {worker.address} (host {worker.host}, pid "
             f"{worker.pid}): {worker.state}, {readiness}",
             f"  {worker.in_flight} requests in flight from the broker, {worker.requests} held, {worker.queued} "
             f"queued, {worker.calls_in_flight} model calls in the pipeline (status {worker.status_age:.1f} s old)"]
    if worker.max_sequences:
        lines.append(f"  generation: {worker.sequences} of {worker.max_sequences} sequence slots used, "
                     f"{worker.waiting_sequences} waiting for their step")
    rows = [["STAGE", "RANK", "STATE", "HOST", "PID", "HEARTBEAT", "RESTARTS"]]
    rows += [agent_row(agent, worker.status_age) for agent in worker.agents]
    return lines + ["  " + line for line in table(rows)]


def agent_row(agent: AgentStatus, status_age: float) -> list[str]:
    """One agent; its heartbeat's age counted until now (the worker's status is `status_age` old)."""
    heartbeat = "-" if agent.heartbeat_age is None else f"{agent.heartbeat_age + status_age:.1f} s ago"
    return [str(agent.stage), str(agent.rank), agent.state, agent.host or "-", str(agent.pid or "-"), heartbeat,
            str(agent.restarts)]


def table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def milliseconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def duration(seconds: float) -> str:
    total = int(seconds)
    days, hours, minutes = total // 86400, total // 3600 % 24, total // 60 % 60
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(days or hours) \
        + [f"{minutes}m"] * bool(days or hours or minutes) + [f"{total % 60}s"]
    return " ".join(parts)
