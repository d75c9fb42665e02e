"""An address that is taken is one line naming it and the likely cause, a non-zero exit, and no traceback: a second
broker on the same port, a second worker on the same distributed address, `zmserve serve` on a taken port; an
agent's publish port that is taken is one line in the agent's and the worker's logs. The broker's worker port
follows --bind."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.cluster import (
    MATMUL_CONFIG,
    MLP_EXAMPLE,
    Cluster,
    Exports,
    free_port,
    log_events,
    wait_for,
    write_servable,
)
from zmserve.supervision import reap
from zmserve_services.agent.processes import publish_address

pytestmark = pytest.mark.slow

ZMSERVE = [sys.executable, "-m", "zmserve.cli"]
IN_USE = "the address is already in use (another zmserve process, or another program, listens there)"


@pytest.fixture
def servable_dir(tmp_path: Path) -> Path:
    return write_servable(tmp_path / "servables", "matmul", MATMUL_CONFIG.format(rank_size=2, stage_size=1))


@pytest.fixture
def first(tmp_path: Path) -> Iterator[list[subprocess.Popen]]:
    """The processes that hold the addresses first (reaped at the end)."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        reap(process, timeout=10)


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([*ZMSERVE, *args], stdout=subprocess.DEVNULL, stderr=log.open("w"))


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def second(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*ZMSERVE, *args], capture_output=True, text=True, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode != 0
    assert result.stderr.splitlines() == [f"Error: {expected}"], result.stderr  # no traceback, no log lines


def test_a_second_broker_on_the_same_port(tmp_path: Path, first: list[subprocess.Popen]) -> None:
    port = free_port()
    first.append(start(["broker", "--bind", f"tcp://127.0.0.1:{port}", "--worker-bind",
                        f"tcp://127.0.0.1:{free_port()}"], tmp_path / "broker.log"))
    wait_for(lambda: listening(port), timeout=30, what="the first broker")
    result = second(["broker", "--bind", f"tcp://127.0.0.1:{port}", "--worker-bind", f"tcp://127.0.0.1:{free_port()}"])
    assert_one_line_error(result, f"cannot bind the broker's client socket to tcp://127.0.0.1:{port}: {IN_USE}")


def test_a_second_broker_moved_with_bind_only_does_not_clash_on_the_worker_port(
        tmp_path: Path, first: list[subprocess.Popen]) -> None:
    """The issue's case: the default broker runs; a second one on another --bind must not fail on 5501."""
    port = free_port()
    first.append(start(["broker", "--bind", f"tcp://127.0.0.1:{port}"], tmp_path / "first.log"))
    wait_for(lambda: log_events(tmp_path / "first.log", "broker_started"), timeout=30, what="the first broker")
    other = free_port()
    first.append(start(["broker", "--bind", f"tcp://127.0.0.1:{other}"], tmp_path / "second.log"))
    [started] = wait_for(lambda: log_events(tmp_path / "second.log", "broker_started"), timeout=30,
                         what="the second broker", details=lambda: (tmp_path / "second.log").read_text())
    assert started["workers"] == f"tcp://127.0.0.1:{other + 1}"


def test_a_second_worker_on_the_same_distributed_address(servable_dir: Path, tmp_path: Path,
                                                         first: list[subprocess.Popen]) -> None:
    distributed = f"127.0.0.1:{free_port()}"
    worker = ["worker", "--servable-dir", str(servable_dir), "--servable", "matmul", "--distributed-address",
              distributed, "--broker", f"tcp://127.0.0.1:{free_port()}"]
    first.append(start(worker, tmp_path / "worker.log"))
    wait_for(lambda: log_events(tmp_path / "worker.log", "worker_started"), timeout=60, what="the first worker")
    result = second(worker)
    assert_one_line_error(result, f"cannot bind the worker's distributed address to tcp://{distributed}: {IN_USE}")


def test_serve_on_a_taken_port(servable_dir: Path, tmp_path: Path, first: list[subprocess.Popen]) -> None:
    port = free_port()
    first.append(start(["broker", "--bind", f"tcp://127.0.0.1:{port}", "--worker-bind",
                        f"tcp://127.0.0.1:{free_port()}"], tmp_path / "broker.log"))
    wait_for(lambda: listening(port), timeout=30, what="the broker")
    result = second(["serve", "--bind", f"tcp://127.0.0.1:{port}", "--servable-dir", str(servable_dir),
                     "--servable", "matmul", "--distributed-address", f"127.0.0.1:{free_port()}"])
    assert_one_line_error(result, f"cannot bind the broker's client socket to tcp://127.0.0.1:{port}: {IN_USE}")


def test_an_address_of_no_interface_here(servable_dir: Path) -> None:
    result = second(["serve", "--bind", "tcp://10.255.255.1:5500", "--servable-dir", str(servable_dir),
                     "--servable", "matmul", "--distributed-address", f"127.0.0.1:{free_port()}"])
    assert_one_line_error(result, "cannot bind the broker's client socket to tcp://10.255.255.1:5500: no network "
                                  "interface of this machine has that address")


def test_a_taken_publish_port_of_a_stage_leader(tmp_path: Path, exports: Exports) -> None:
    """Rank 0 leads stage 0 of the MLP and publishes its output at --agent-start-port + 0 (on loopback, the Unix
    socket named after that port), which is taken: it fails to load in one line (no traceback), and the worker
    says why it restarts the groups."""
    model_files = exports.mlp(4, 2)
    port = free_port()
    address = publish_address("127.0.0.1", port)
    taken = zmq.Context.instance().socket(zmq.PULL)
    taken.bind(address)
    try:
        cluster = Cluster(tmp_path, MLP_EXAMPLE, "mlp", model_files, extra_agent_args=["--agent-start-port", str(port)])
        try:
            failed = wait_for(lambda: [e for e in log_events(cluster.logs["worker"], "agent_lost")
                                       if e["why"].startswith("agent failed")],
                              timeout=180, what="the worker to lose rank 0 for its failure", details=cluster.log_tails)
        finally:
            cluster.stop()
    finally:
        taken.close(linger=0)
    cause = f"cannot bind the publish socket of rank 0 (--agent-start-port + its position) to {address}"
    assert failed[0]["agent_rank"] == 0 and failed[0]["why"] == f"agent failed: {cause}: {IN_USE}"
    [load_failed, *_] = log_events(cluster.logs["agents"], "agent_load_failed")
    assert load_failed["why"] == f"{cause}: {IN_USE}" and "exception" not in load_failed
    assert "Traceback" not in cluster.logs["agents"].read_text()

