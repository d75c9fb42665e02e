"""Shared fixtures: the real MatMul clusters (rank_size 2 and 8), exported and started once per session."""

from collections.abc import Iterator

import pytest

from tests.cluster import Cluster, start_matmul_cluster


@pytest.fixture(scope="session")
def matmul_tp2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_matmul_cluster(tmp_path_factory.mktemp("matmul_tp2"), 2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def matmul_tp8(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_matmul_cluster(tmp_path_factory.mktemp("matmul_tp8"), 8)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def echo_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """tests/generator_servable.py's `echo` (a pure-Python generator method) on `zmserve serve` and one agent,
    shared by the streaming tests of the client, the gateway and the bench."""
    from tests.generator_servable import start

    cluster = start(tmp_path_factory.mktemp("echo"), colocated=True)
    yield cluster
    codes = cluster.stop()
    assert set(codes.values()) == {0}, codes
