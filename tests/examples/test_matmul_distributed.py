"""The reference flow end to end: real broker, worker and MindSpore agents, rank_size 2 and 8."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cluster import Cluster, matmul_reference
from zmserve.client import ClientError

pytestmark = pytest.mark.slow


@pytest.fixture(params=["matmul_tp2", "matmul_tp8"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    return request.getfixturevalue(request.param)


def test_ones_give_minus_48(cluster: Cluster) -> None:
    with cluster.client() as client:
        result = client.infer({"x": np.ones((128, 96), np.float32)})
    assert len(result) == 1 and set(result[0]) == {"y"}
    y = result[0]["y"]
    assert y.shape == (128, 16) and y.dtype == np.float32
    assert (y == -48.0).all()


def test_random_input_matches_numpy(cluster: Cluster) -> None:
    x = np.random.default_rng(7).standard_normal((128, 96)).astype(np.float32)
    with cluster.client() as client:
        y = client.infer({"x": x})[0]["y"]
    np.testing.assert_allclose(y, matmul_reference(x), atol=1e-5, rtol=0)


def test_several_instances_in_one_call(cluster: Cluster) -> None:
    rng = np.random.default_rng(11)
    xs = [rng.uniform(-1, 1, (128, 96)).astype(np.float32) for _ in range(5)]
    with cluster.client() as client:
        results = client.infer([{"x": x} for x in xs])
    assert len(results) == 5
    for x, result in zip(xs, results, strict=True):
        np.testing.assert_allclose(result["y"], matmul_reference(x), atol=1e-5, rtol=0)


def test_async_calls_from_many_threads_each_get_their_answer(matmul_tp2: Cluster) -> None:
    rng = np.random.default_rng(3)
    xs = [rng.uniform(-1, 1, (128, 96)).astype(np.float32) for _ in range(40)]
    with matmul_tp2.client() as client:
        futures = [client.infer_async({"x": x}) for x in xs]
        for x, future in zip(xs, futures, strict=True):
            np.testing.assert_allclose(future.result(timeout=60)[0]["y"], matmul_reference(x), atol=1e-5)


@pytest.mark.parametrize(
    ("instance", "fragment"),
    [
        ({"z": np.ones((128, 96), np.float32)}, "takes inputs ['x']"),
        ({"x": np.ones((128, 95), np.float32)}, "must have shape (128, 96)"),
        ({"x": np.ones((128, 96), np.float64)}, "must be float32"),
        ({"x": "a string"}, "must be a tensor"),
    ],
)
def test_bad_input_is_rejected_by_the_worker(matmul_tp2: Cluster, instance: dict, fragment: str) -> None:
    with matmul_tp2.client() as client, pytest.raises(ClientError) as caught:
        client.infer(instance)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert fragment in caught.value.message
    with matmul_tp2.client() as client:
        assert (client.infer({"x": np.ones((128, 96), np.float32)})[0]["y"] == -48).all()
