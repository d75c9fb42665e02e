"""Metrics, `zmserve status` and the status page against a running PP2 x TP2 cluster (the MLP example, rank_size 4,
stage_size 2) with a gateway: known traffic counted on every metrics endpoint (parsed with
prometheus_client.parser), the status checked field by field, the page read from a real headless Chromium, and
all three following an agent that is killed while traffic runs, until the servable serves again."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.browser import chromium
from tests.cluster import (
    MATMUL_CONFIG,
    Cluster,
    Exports,
    agent_rank,
    child_pids,
    wait_for,
    write_servable,
)
from zmserve.client import ClientError
from zmserve.status import query_status

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
X_SHAPE = (16, 64)  # the MLP example's input (examples/mlp_pipeline: batch 16, hidden 64)
ONES = {"x": np.ones(X_SHAPE, np.float32)}
HEADER = 400
"""More than any request's or answer's header in these tests (msgpack; about 100-300 bytes)."""


@dataclass
class Deployment:
    cluster: Cluster
    gateway: str
    """The gateway's base URL."""
    workdir: Path

    def agent_pids(self) -> dict[int, int]:
        """rank -> pid of the agents running now (children of the launcher)."""
        pids = {}
        for pid in child_pids(self.cluster.processes["agents"].pid):
            rank = agent_rank(pid)
            if rank is not None:
                pids[rank] = pid
        return pids


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("observability")
    model_files = exports.mlp(4, 2)
    servables = write_servable(workdir / "servables", "mlp", MATMUL_CONFIG.format(rank_size=4, stage_size=2))
    cluster = Cluster(workdir, servables, "mlp", model_files)
    try:
        cluster.wait_ready(ONES)
        yield Deployment(cluster, cluster.start_gateway(), workdir)
    finally:
        codes = cluster.stop()
    assert codes == {"agents": 0, "worker": 0, "broker": 0, "gateway": 0}, cluster.log_tails()


# ---- helpers ------------------------------------------------------------------------------------------------------
Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every sample named `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def post(base_url: str, path: str, body: bytes) -> tuple[int, bytes]:
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def status_json(deployment: Deployment) -> dict:
    result = subprocess.run([sys.executable, "-m", "zmserve.cli", "status", "--broker",
                             deployment.cluster.client_address, "--json"], capture_output=True, text=True,
                            timeout=60, check=True)
    return json.loads(result.stdout)


def agent_restarts(worker_samples: Samples) -> dict[int, int]:
    """rank -> restarts, as the worker's metrics count them (0 for a rank never restarted)."""
    found = {int(dict(labels)["rank"]): int(v) for (name, labels), v in worker_samples.items()
             if name == "zmserve_worker_agent_restarts_total"}
    return {rank: found.get(rank, 0) for rank in range(4)}


def status_when(cluster: Cluster, condition, timeout: float, what: str):
    """The broker's STATUS once `condition` holds for it."""
    def check():
        status = query_status(cluster.client_address)
        return status if condition(status) else None
    return wait_for(check, timeout=timeout, interval=0.1, what=what, details=cluster.log_tails)


PAGE_SUMMARY = """
const pick = (selector, root) => [...(root || document).querySelectorAll(selector)];
return {
  refreshes: Number(document.body.dataset.refreshes || 0),
  error: document.getElementById("error").hidden ? null : document.getElementById("error").textContent,
  servables: pick("#servables tbody tr").map(row => ({name: row.dataset.servable, ready: row.dataset.ready,
                                                      text: row.innerText})),
  workers: pick(".worker").map(w => ({servable: w.dataset.servable, ready: w.dataset.ready, state: w.dataset.state,
                                      text: w.innerText})),
  agents: pick(".agent").map(a => ({rank: Number(a.dataset.rank), state: a.dataset.state, pid: Number(a.dataset.pid),
                                    restarts: Number(a.dataset.restarts),
                                    colour: getComputedStyle(a).backgroundColor})),
  charts: pick("svg.chart").map(c => ({servable: c.dataset.servable, points: Number(c.dataset.points),
                                       bars: pick("rect.rate", c).reduce((n, r) => n + Number(r.dataset.requests), 0),
                                       p50: pick("path.p50", c).length, p99: pick("path.p99", c).length,
                                       width: c.getBoundingClientRect().width})),
};
"""


def page(driver) -> dict:
    return driver.execute_script(PAGE_SUMMARY)


def page_after_refresh(driver, condition, timeout: float, what: str) -> dict:
    """The page's summary once it has refreshed by itself and shows `condition`."""
    seen = page(driver)["refreshes"]
    return wait_for(lambda: (p := page(driver))["refreshes"] > seen and condition(p) and p, timeout=timeout,
                    interval=0.2, what=what, details=lambda: json.dumps(page(driver), indent=1)[:3000])


# ---- known traffic, counted everywhere ---------------------------------------------------------------------------
def test_every_endpoint_counts_known_traffic(deployment: Deployment) -> None:
    cluster = deployment.cluster
    urls = cluster.metrics
    before = {name: scrape(urls[name]) for name in ("broker", "worker", "gateway")}
    rng = np.random.default_rng(0)

    ok, invalid, not_found = 12, 3, 2
    with cluster.client() as client:
        for _ in range(ok):
            client.infer({"x": rng.standard_normal(X_SHAPE).astype(np.float32)}, timeout=30)
        for _ in range(invalid):  # the worker checks the shape against the model's signature
            with pytest.raises(ClientError, match="INVALID_ARGUMENT"):
                client.infer({"x": np.ones((3, 64), np.float32)}, timeout=30)
    with cluster.client(method="nosuch") as client:
        for _ in range(not_found):  # the broker knows the servable has no such method
            with pytest.raises(ClientError, match="NOT_FOUND"):
                client.infer(ONES, timeout=30)

    http_ok = 4
    bodies = [json.dumps({"instances": [{"x": rng.standard_normal(X_SHAPE).round(3).tolist()}]}).encode()
              for _ in range(http_ok)]
    answers = [post(deployment.gateway, "/model/mlp:predict", body) for body in bodies]
    missing_body = json.dumps({"instances": [{"x": [[1.0]]}]}).encode()
    answers.append(post(deployment.gateway, "/model/nosuch:predict", missing_body))
    assert [status for status, _ in answers] == [200] * http_ok + [404]

    after = {name: scrape(urls[name]) for name in ("broker", "worker", "gateway")}
    broker_before, broker_after = before["broker"], after["broker"]
    mlp = {"servable": "mlp", "method": "predict", "version": "1"}
    routed_ok = ok + http_ok
    assert delta(broker_before, broker_after, "zmserve_broker_requests_total", **mlp, code="OK") == routed_ok
    assert delta(broker_before, broker_after, "zmserve_broker_requests_total", **mlp,
                 code="INVALID_ARGUMENT") == invalid
    assert delta(broker_before, broker_after, "zmserve_broker_requests_total", servable="", method="",
                 code="NOT_FOUND") == not_found + 1  # + the gateway's request for 'nosuch'
    assert delta(broker_before, broker_after, "zmserve_broker_request_duration_seconds_count",
                 **mlp) == routed_ok + invalid
    values_in = ((routed_ok + not_found) * 16 + invalid * 3) * 64 * 4 + 4  # each x; a header is < HEADER bytes
    requests = routed_ok + invalid + not_found + 1
    assert values_in < delta(broker_before, broker_after, "zmserve_broker_received_bytes_total") \
        < values_in + requests * HEADER
    values_out = routed_ok * 16 * 64 * 4
    assert values_out < delta(broker_before, broker_after, "zmserve_broker_sent_bytes_total") \
        < values_out + requests * HEADER
    assert total(broker_after, "zmserve_broker_requests_in_flight", servable="mlp") == 0
    assert total(broker_after, "zmserve_broker_workers", servable="mlp", ready="true") == 1

    worker_before, worker_after = before["worker"], after["worker"]
    assert delta(worker_before, worker_after, "zmserve_worker_requests_total", **mlp, code="OK") == routed_ok
    assert delta(worker_before, worker_after, "zmserve_worker_requests_total", **mlp,
                 code="INVALID_ARGUMENT") == invalid
    assert delta(worker_before, worker_after, "zmserve_worker_request_duration_seconds_count",
                 **mlp) == routed_ok + invalid
    model = {"servable": "mlp", "version": "1"}
    for histogram in ("queue_duration_seconds", "model_duration_seconds", "batch_size"):  # one call per instance
        assert delta(worker_before, worker_after, f"zmserve_worker_{histogram}_count", **model) == routed_ok
    assert delta(worker_before, worker_after, "zmserve_worker_batch_size_sum", **model) == routed_ok
    assert delta(worker_before, worker_after, "zmserve_worker_model_sent_bytes_total", **model) \
        == routed_ok * 16 * 64 * 4  # each call's input, no header
    assert delta(worker_before, worker_after, "zmserve_worker_model_received_bytes_total", **model) \
        == routed_ok * 16 * 64 * 4
    assert total(worker_after, "zmserve_worker_agents_ready", **model) == 4
    assert total(worker_after, "zmserve_worker_agents_expected", **model) == 4
    assert total(worker_after, "zmserve_worker_serving", **model) == 1
    assert total(worker_after, "zmserve_worker_requests_held", **model) == 0
    assert total(worker_after, "zmserve_worker_model_calls_in_flight", **model) == 0
    # every restart of the agents (none, unless the start itself needed one) ended in a formation
    assert total(worker_after, "zmserve_worker_group_formation_duration_seconds_count", **model) \
        == total(worker_after, "zmserve_worker_group_restarts_total", **model) + 1
    assert 0 < total(worker_after, "zmserve_worker_group_formation_duration_seconds_sum", **model) < 300
    assert total(worker_after, "process_cpu_seconds_total") > 0

    gateway_before, gateway_after = before["gateway"], after["gateway"]
    assert delta(gateway_before, gateway_after, "zmserve_gateway_http_requests_total", route="ms_rest",
                 status="200") == http_ok
    assert delta(gateway_before, gateway_after, "zmserve_gateway_http_requests_total", route="ms_rest",
                 status="404") == 1
    assert delta(gateway_before, gateway_after, "zmserve_gateway_requests_total", servable="mlp",
                 method="predict", version="0", code="OK") == http_ok
    assert delta(gateway_before, gateway_after, "zmserve_gateway_requests_total", servable="",
                 code="NOT_FOUND") == 1
    assert delta(gateway_before, gateway_after, "zmserve_gateway_received_bytes_total") \
        == sum(map(len, bodies)) + len(missing_body)
    assert delta(gateway_before, gateway_after, "zmserve_gateway_sent_bytes_total") \
        == sum(len(body) for _, body in answers)
    assert delta(gateway_before, gateway_after, "zmserve_gateway_http_request_duration_seconds_count",
                 route="ms_rest") == http_ok + 1


# ---- zmserve status ----------------------------------------------------------------------------------------------
def test_status_json_field_by_field(deployment: Deployment) -> None:
    cluster = deployment.cluster
    status = status_json(deployment)
    assert status["type"] == "status" and status["in_flight"] == 0 and status["uptime_s"] > 0
    assert status["lost"] == []
    (servable,) = status["servables"]
    assert (servable["servable"], servable["version"], servable["methods"], servable["ready"],
            servable["reason"]) == ("mlp", 1, ["predict"], True, "")
    (worker,) = status["workers"]
    assert (worker["servable"], worker["version"], worker["ready"], worker["reason"], worker["state"]) == \
        ("mlp", 1, True, "", "serving")
    assert worker["address"] == cluster.distributed_address
    assert (worker["host"], worker["pid"]) == (socket.gethostname(), cluster.processes["worker"].pid)
    assert worker["methods"] == ["predict"]
    assert (worker["requests"], worker["queued"], worker["calls_in_flight"], worker["in_flight"]) == (0, 0, 0, 0)
    assert 0 <= worker["status_age"] < 3
    pids, restarts = deployment.agent_pids(), agent_restarts(scrape(cluster.metrics["worker"]))
    assert [(a["rank"], a["stage"], a["state"], a["host"], a["pid"], a["restarts"]) for a in worker["agents"]] == \
        [(rank, rank // 2, "ready", "127.0.0.1", pids[rank], restarts[rank]) for rank in range(4)]
    assert all(0 <= a["heartbeat_age"] < 3 for a in worker["agents"])

    (traffic,) = status["traffic"]
    assert (traffic["servable"], traffic["window_s"], traffic["step_s"]) == ("mlp", 60.0, 5)
    assert traffic["requests"] >= traffic["errors"] > 0  # the readiness probes before serving, the refused ones
    assert 0 < traffic["p50_ms"] <= traffic["p99_ms"] < 10_000
    assert len(traffic["series"]) == 60
    broker_ok = total(scrape(cluster.metrics["broker"]), "zmserve_broker_requests_total", servable="mlp", code="OK")
    answered = sum(requests - errors for _, requests, errors, _, _ in traffic["series"])
    assert answered == broker_ok  # every answered request of the last 5 minutes, in the chart's points

    text = subprocess.run([sys.executable, "-m", "zmserve.cli", "status", "--broker", cluster.client_address],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert text.splitlines()[3].split()[:4] == ["mlp", "1", "predict", "yes"]
    assert f"worker mlp v1 at {cluster.distributed_address}" in text and "serving, ready" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("  ")][2:]
    assert [row[:5] for row in rows] == [[str(rank // 2), str(rank), "ready", "127.0.0.1", str(pids[rank])]
                                         for rank in range(4)]
    assert [row[-1] for row in rows] == [str(restarts[rank]) for rank in range(4)]


def test_status_watch_redraws_until_interrupted(deployment: Deployment) -> None:
    """Started with SIGINT ignored, as a shell without job control starts a background command (and as this
    suite's children inherit it when the suite itself runs in the background): SIGINT still ends the watch."""
    process = subprocess.Popen([sys.executable, "-m", "zmserve.cli", "status", "--broker",
                                deployment.cluster.client_address, "--watch", "--json", "--interval", "0.2"],
                               stdout=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        answers = [json.loads(process.stdout.readline()) for _ in range(3)]
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=10)
    assert code == 0
    assert [a["type"] for a in answers] == ["status"] * 3
    assert answers[0]["uptime_s"] < answers[1]["uptime_s"] < answers[2]["uptime_s"]


# ---- the status page in Chromium ---------------------------------------------------------------------------------
def test_status_page_in_chromium(deployment: Deployment) -> None:
    with chromium(deployment.workdir / "chromium-page") as driver:
        driver.get(deployment.gateway + "/")
        shown = page_after_refresh(driver, lambda p: p["agents"], timeout=30, what="the page's first render")
        assert shown["error"] is None
        assert [(s["name"], s["ready"]) for s in shown["servables"]] == [("mlp", "true")]
        assert shown["servables"][0]["text"].split("\t")[:4] == ["mlp", "1", "predict", "ready"]
        assert [(w["servable"], w["ready"], w["state"]) for w in shown["workers"]] == [("mlp", "true", "serving")]
        pids, restarts = deployment.agent_pids(), agent_restarts(scrape(deployment.cluster.metrics["worker"]))
        assert [(a["rank"], a["state"], a["pid"], a["restarts"]) for a in shown["agents"]] == \
            [(rank, "ready", pids[rank], restarts[rank]) for rank in range(4)]
        assert {a["colour"] for a in shown["agents"]} == {"rgb(26, 127, 55)"}  # .state-ready
        (chart,) = shown["charts"]
        assert chart["servable"] == "mlp" and chart["points"] == 60 and chart["width"] > 600
        assert chart["bars"] > 0 and chart["p50"] == 1 and chart["p99"] == 1
        assert driver.find_element("css selector", "#broker").text == deployment.cluster.client_address
        driver.save_screenshot(str(deployment.workdir / "status_page.png"))


# ---- an agent killed under traffic -------------------------------------------------------------------------------
class Traffic(threading.Thread):
    """Requests one after another (paced, so the restart has CPU left), each answer's code counted."""

    def __init__(self, deployment: Deployment) -> None:
        super().__init__(daemon=True)
        self.client = deployment.cluster.client()
        self.codes: Counter[str] = Counter()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.client.infer(ONES, timeout=20)
                self.codes["OK"] += 1
            except ClientError as error:
                self.codes[error.code] += 1
            self.stopped.wait(0.05)  # pacing, not synchronisation

    def stop(self) -> Counter[str]:
        self.stopped.set()
        self.join(timeout=30)
        self.client.close()
        return self.codes


def test_a_killed_agent_is_seen_restarting_then_ready(deployment: Deployment) -> None:
    cluster = deployment.cluster
    broker_before, worker_before = scrape(cluster.metrics["broker"]), scrape(cluster.metrics["worker"])
    old_pids, old_restarts = deployment.agent_pids(), agent_restarts(worker_before)
    traffic = Traffic(deployment)
    traffic.start()
    with chromium(deployment.workdir / "chromium-restart") as driver:
        driver.get(deployment.gateway + "/")
        page_after_refresh(driver, lambda p: [a["state"] for a in p["agents"]] == ["ready"] * 4, timeout=30,
                           what="every agent ready on the page")
        wait_for(lambda: traffic.codes["OK"] >= 5, timeout=30, what="traffic flowing")

        os.kill(old_pids[2], signal.SIGKILL)

        def restarting(status) -> bool:
            (worker,) = status.workers or [None]
            return worker is not None and not worker.ready and any(a.state != "ready" for a in worker.agents)

        status = status_when(cluster, restarting, timeout=30, what="zmserve status showing the restart")
        assert status.workers[0].reason and status.servables[0].ready is False
        shown = page_after_refresh(driver, lambda p: p["workers"] and p["workers"][0]["ready"] == "false",
                                   timeout=30, what="the page showing the servable not ready")
        assert any(a["state"] in ("restarting", "registered", "configured") for a in shown["agents"])
        assert "not ready" in shown["workers"][0]["text"] and shown["servables"][0]["ready"] == "false"

        def serving_again(status) -> bool:
            (worker,) = status.workers or [None]
            return worker is not None and worker.ready and all(a.restarts > old_restarts[a.rank]
                                                               for a in worker.agents)

        status = status_when(cluster, serving_again, timeout=180, what="zmserve status showing it ready again")
        new_pids = deployment.agent_pids()
        assert [(a.state, a.pid, a.restarts) for a in status.workers[0].agents] == \
            [("ready", new_pids[rank], old_restarts[rank] + 1) for rank in range(4)]  # each rank a new process
        assert set(new_pids.values()).isdisjoint(old_pids.values())  # every rank is a new process
        shown = page_after_refresh(driver, lambda p: [(a["state"], a["restarts"]) for a in p["agents"]]
                                   == [("ready", old_restarts[rank] + 1) for rank in range(4)], timeout=30,
                                   what="the page showing every agent ready again")
        assert [a["pid"] for a in shown["agents"]] == [new_pids[rank] for rank in range(4)]
        answered = traffic.codes["OK"]
        wait_for(lambda: traffic.codes["OK"] >= answered + 3, timeout=60, what="traffic answered again")
        page_after_refresh(driver, lambda p: True, timeout=10, what="one more refresh")
        driver.save_screenshot(str(deployment.workdir / "status_page_restarted.png"))
        if os.environ.get("ZMSERVE_SCREENSHOT"):  # refreshes the README's picture: ZMSERVE_SCREENSHOT=docs/x.png
            shutil.copy(deployment.workdir / "status_page_restarted.png", REPO / os.environ["ZMSERVE_SCREENSHOT"])
    codes = traffic.stop()

    assert set(codes) <= {"OK", "UNAVAILABLE"} and codes["UNAVAILABLE"] > 0, codes
    broker_after, worker_after = scrape(cluster.metrics["broker"]), scrape(cluster.metrics["worker"])
    for code, count in codes.items():  # every answer the client saw, counted once by the broker
        assert delta(broker_before, broker_after, "zmserve_broker_requests_total", servable="mlp",
                     method="predict", code=code) == count, code
    model = {"servable": "mlp", "version": "1"}
    assert agent_restarts(worker_after) == {rank: old_restarts[rank] + 1 for rank in range(4)}
    assert delta(worker_before, worker_after, "zmserve_worker_group_restarts_total", **model) == 1
    assert delta(worker_before, worker_after, "zmserve_worker_group_formation_duration_seconds_count", **model) == 1
    assert total(worker_after, "zmserve_worker_agents_ready", **model) == 4


# ---- zmserve serve: one endpoint, both sets ----------------------------------------------------------------------
STAGED_CONFIG = """
from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size=1, stage_size=1, with_batch_dim=False)


def double(x):
    return x * 2


@register.register_method(output_names=["y"])
def predict(x):
    x2 = register.add_stage(double, x, outputs_count=1)
    return register.add_stage(model, x2, outputs_count=1)
"""


def test_serve_shows_broker_and_worker_metrics_on_one_endpoint(tmp_path: Path, exports: Exports) -> None:
    model_files = exports.matmul(1)
    servables = write_servable(tmp_path / "servables", "matmul", STAGED_CONFIG)
    cluster = Cluster(tmp_path, servables, "matmul", model_files, colocated=True)
    try:
        cluster.wait_ready({"x": np.ones((128, 96), np.float32)})
        assert cluster.metrics["broker"] == cluster.metrics["worker"]
        before = scrape(cluster.metrics["worker"])
        with cluster.client() as client:
            for _ in range(5):
                client.infer({"x": np.ones((128, 96), np.float32)}, timeout=30)
        after = scrape(cluster.metrics["worker"])
    finally:
        codes = cluster.stop()
    assert codes["agents"] == 0 and codes["worker"] == 0, cluster.log_tails()
    labels = {"servable": "matmul", "method": "predict", "version": "1", "code": "OK"}
    assert delta(before, after, "zmserve_broker_requests_total", **labels) == 5
    assert delta(before, after, "zmserve_worker_requests_total", **labels) == 5
    assert delta(before, after, "zmserve_worker_stage_duration_seconds_count", servable="matmul", method="predict",
                 stage="double") == 5  # the Python stage, timed on its own
    assert total(after, "zmserve_worker_agents_ready", servable="matmul") == 1
