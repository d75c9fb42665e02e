"""A client that gives up cancels its request, and the broker and the worker honour it: a request still queued in
the worker is dropped and never reaches the agents; one already with the agents finishes and its result is
discarded. Three ways to give up: `future.cancel()`, closing the `Client`, and an HTTP client that disconnects
from the gateway.

The worker runs with `--max-inflight 1` in front of an MLP that takes about 0.3 s a call, so requests queue in the
worker behind the one the agents are computing. The worker's `worker_stopped` line counts the model calls it
published: exactly the ones nobody cancelled in time."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import (
    MATMUL_CONFIG,
    MLP_EXAMPLE,
    Exports,
    load_example_module,
    log_events,
    wait_for,
    write_servable,
)
from zmserve.client import Client, ClientError
from zmserve.local import LocalCluster

pytestmark = pytest.mark.slow

mlp = load_example_module(MLP_EXAMPLE / "export_model.py", "mlp_export_for_cancel")
SLOW = {"batch": 256, "hidden": 128, "ffn": 16384}
"""About 0.3 s per call on 2 cores (more under load, which only widens the window the test needs)."""
X = np.random.default_rng(7).standard_normal((SLOW["batch"], SLOW["hidden"])).astype(np.float32)
GIVE_UP = 8
"""Requests queued behind the running one, then given up."""


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> tuple[Path, list[Path], np.ndarray]:
    workdir = tmp_path_factory.mktemp("slow_mlp_cancel")
    model_files = exports.mlp(1, 1, *(f"--{k}={v}" for k, v in SLOW.items()))
    servable_dir = write_servable(workdir / "servables", "mlp", MATMUL_CONFIG.format(rank_size=1, stage_size=1))
    expected = mlp.reference_forward(X, mlp.make_weights(mlp.DEFAULT_LAYERS, SLOW["hidden"], SLOW["ffn"]))
    return servable_dir, model_files, expected


@pytest.fixture
def cluster(tmp_path: Path, slow_model: tuple[Path, list[Path], np.ndarray]) -> Iterator[LocalCluster]:
    servable_dir, model_files, _ = slow_model
    cluster = LocalCluster(tmp_path, servable_dir, "mlp", model_files, ["--max-inflight", "1"])
    try:
        cluster.wait_ready({"x": X})
        yield cluster
    finally:
        cluster.stop()


def http_predict(gateway: str) -> socket.socket:
    """An HTTP request to the gateway (MindSpore Serving's scheme) on a connection of its own, not read yet."""
    host, port = gateway.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"instances": [{"x": X.tolist()}]}).encode()
    head = (f"POST /model/mlp:predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(head + body)
    return connection


def give_up(cluster: LocalCluster, how: str, gateway: str | None) -> None:
    """Send GIVE_UP requests, which queue in the worker behind the keepers, and give up on them. A client's
    cancel follows its request down the same sockets, so the worker always holds the request when its cancel
    comes; the gateway forwards a request only once it has read its body, so the test waits for that first."""
    if how == "future_cancel":
        with cluster.client() as client:
            futures = [client.infer_async({"x": X}, timeout=60) for _ in range(GIVE_UP)]
            assert all(future.cancel() for future in futures)
    elif how == "client_close":
        client = Client(cluster.client_address, "mlp", "predict")
        futures = [client.infer_async({"x": X}, timeout=60) for _ in range(GIVE_UP)]
        client.close()
        for future in futures:
            with pytest.raises(ClientError, match="the client was closed"):
                future.result(timeout=5)
    else:
        assert gateway is not None
        connections = [http_predict(gateway) for _ in range(GIVE_UP)]
        wait_for(lambda: len(log_events(cluster.logs["gateway"], "request_sent")) >= GIVE_UP, timeout=30,
                 what="the gateway to forward the requests", details=cluster.log_tails)
        for connection in connections:
            connection.close()
        wait_for(lambda: len(log_events(cluster.logs["gateway"], "request_abandoned")) >= GIVE_UP, timeout=30,
                 what="the gateway to see the callers hang up", details=cluster.log_tails)


KEEPERS = 3
"""Requests sent first, which keep the model busy for about a second while the others queue behind them."""


@pytest.mark.parametrize("how", ["future_cancel", "client_close", "http_disconnect"])
def test_cancelled_requests_queued_in_the_worker_never_reach_the_agents(
        cluster: LocalCluster, slow_model: tuple[Path, list[Path], np.ndarray], how: str) -> None:
    expected = slow_model[2]
    # the gateway starts first: a process start can take longer than the keepers keep the model busy
    gateway = cluster.start_gateway() if how == "http_disconnect" else None
    with cluster.client() as client:
        keepers = [client.infer_async({"x": X}, timeout=60) for _ in range(KEEPERS)]
        in_model = keepers[0]
        if how == "future_cancel":  # the first keeper is with the agents at once (the pipeline was empty)
            assert in_model.cancel()
        give_up(cluster, how, gateway)
        after = client.infer_async({"x": X}, timeout=60)
        for future in [*keepers[1:], after]:
            np.testing.assert_allclose(future.result(timeout=60)[0]["y"], expected, atol=1e-4, rtol=0)
        if how != "future_cancel":
            np.testing.assert_allclose(in_model.result(timeout=60)[0]["y"], expected, atol=1e-4, rtol=0)
    codes = cluster.stop()
    assert set(codes.values()) == {0}, codes
    cancelled = log_events(cluster.logs["worker"], "request_cancelled")
    queued = [e for e in cancelled if not e["reached_agents"]]
    assert len(queued) == GIVE_UP, cancelled
    assert len(log_events(cluster.logs["broker"], "request_cancelled")) == len(cancelled)
    published = log_events(cluster.logs["worker"], "worker_stopped")[0]["model_calls"]
    # wait_ready's call, the keepers (the cancelled one was with the agents already) and the one after
    assert published == 1 + KEEPERS + 1, f"{published} model calls: a cancelled request reached the agents"
    if how == "future_cancel":
        assert [e["reached_agents"] for e in cancelled if e["reached_agents"]] == [True]
        assert not log_events(cluster.logs["broker"], "late_reply_dropped"), "the worker answered a cancelled run"
