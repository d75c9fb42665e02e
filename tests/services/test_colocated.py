"""`zmserve serve`: broker and worker in one process answer exactly as the two processes do."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tests.cluster import Cluster, Exports, log_events, matmul_reference, start_matmul_cluster
from zmserve.client import ClientError
from zmserve.protocol import ErrorCode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> Iterator[Cluster]:
    cluster = start_matmul_cluster(tmp_path_factory.mktemp("colocated"), exports, 2, colocated=True)
    yield cluster
    cluster.stop()


def test_serves_correct_results_sync_and_async(cluster: Cluster) -> None:
    xs = np.random.default_rng(7).standard_normal((6, 128, 96)).astype(np.float32)
    with cluster.client() as client:
        for x in xs[:3]:
            np.testing.assert_allclose(client.infer({"x": x}, timeout=10)[0]["y"], matmul_reference(x), atol=1e-5)
        futures = [client.infer_async({"x": x}, timeout=10) for x in xs[3:]]
        for x, future in zip(xs[3:], futures, strict=True):
            np.testing.assert_allclose(future.result()[0]["y"], matmul_reference(x), atol=1e-5)


def test_errors_keep_their_codes(cluster: Cluster) -> None:
    with cluster.client(method="train") as client, pytest.raises(ClientError) as caught:
        client.infer({"x": np.ones((128, 96), np.float32)}, timeout=10)
    assert caught.value.code is ErrorCode.NOT_FOUND and "no method 'train'" in caught.value.message
    with cluster.client() as client, pytest.raises(ClientError) as caught:
        client.infer({"x": np.ones((128, 95), np.float32)}, timeout=10)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT


def test_stops_cleanly_answering_what_it_holds(cluster: Cluster) -> None:
    with cluster.client() as client:
        futures = [client.infer_async({"x": np.ones((128, 96), np.float32)}, timeout=30) for _ in range(20)]
        codes = cluster.stop()
        outcomes = []
        for future in futures:
            try:
                future.result(timeout=10)
                outcomes.append("OK")
            except ClientError as error:
                outcomes.append(error.code)
    assert codes["worker"] == 0, cluster.log_tails()
    assert set(outcomes) <= {"OK", ErrorCode.UNAVAILABLE}, outcomes
    assert len(log_events(cluster.logs["worker"], "worker_stopped")) == 1
    assert len(log_events(cluster.logs["worker"], "broker_stopped")) == 1
    assert len(log_events(cluster.logs["worker"], "drained")) == 1  # SIGTERM: `zmserve serve` drains too
