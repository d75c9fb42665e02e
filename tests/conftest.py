"""Shared fixtures: every example model exported once per session, and the real MatMul clusters (rank_size 2
and 8) started once per session."""

from collections.abc import Iterator

import pytest

from tests.cluster import Cluster, Exports, start_matmul_cluster


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return Exports(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="session")
def matmul_tp2(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> Iterator[Cluster]:
    cluster = start_matmul_cluster(tmp_path_factory.mktemp("matmul_tp2"), exports, 2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def matmul_tp8(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> Iterator[Cluster]:
    cluster = start_matmul_cluster(tmp_path_factory.mktemp("matmul_tp8"), exports, 8)
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
