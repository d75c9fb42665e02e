"""Shared fixtures: the real MatMul clusters (rank_size 2 and 8), exported and started once per session."""

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import MATMUL_CONFIG, Cluster, export_matmul, write_servable

ONES = {"x": np.ones((128, 96), np.float32)}


def start_matmul_cluster(workdir: Path, rank_size: int) -> Cluster:
    model_files = export_matmul(workdir, rank_size)
    servable_dir = write_servable(workdir / "servables", "matmul", MATMUL_CONFIG.format(rank_size=rank_size,
                                                                                        stage_size=1))
    cluster = Cluster(workdir, servable_dir, "matmul", model_files)
    try:
        cluster.wait_ready(ONES)
    except BaseException:
        cluster.stop()
        raise
    return cluster


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
