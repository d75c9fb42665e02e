"""Routing by (servable, method, version) through a real broker in front of a real worker."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cluster import Cluster
from zmserve.client import Client, ClientError

pytestmark = pytest.mark.slow

ONES = {"x": np.ones((128, 96), np.float32)}


def call(cluster: Cluster, servable: str, method: str, version: int = 0) -> ClientError:
    with Client(cluster.client_address, servable, method, version) as client, pytest.raises(ClientError) as caught:
        client.infer(ONES, timeout=10)
    return caught.value


def test_unknown_servable_is_not_found_and_names_what_exists(matmul_tp2: Cluster) -> None:
    error = call(matmul_tp2, "nosuch", "predict")
    assert error.code == "NOT_FOUND"
    assert "'nosuch'" in error.message and "matmul" in error.message and "predict" in error.message


def test_unknown_method_is_not_found(matmul_tp2: Cluster) -> None:
    error = call(matmul_tp2, "matmul", "train")
    assert error.code == "NOT_FOUND" and "predict" in error.message


def test_unknown_version_is_not_found(matmul_tp2: Cluster) -> None:
    error = call(matmul_tp2, "matmul", "predict", version=7)
    assert error.code == "NOT_FOUND" and "[1]" in error.message


def test_explicit_version_is_served(matmul_tp2: Cluster) -> None:
    with Client(matmul_tp2.client_address, "matmul", "predict", 1) as client:
        assert (client.infer(ONES)[0]["y"] == -48).all()


@pytest.mark.parametrize("address_form", ["tcp://127.0.0.1:{port}", "127.0.0.1:{port}", "localhost:{port}"])
def test_client_accepts_address_forms(matmul_tp2: Cluster, address_form: str) -> None:
    port = matmul_tp2.client_address.rsplit(":", 1)[1]
    with Client(address_form.format(port=port), "matmul", "predict") as client:
        assert (client.infer(ONES)[0]["y"] == -48).all()
