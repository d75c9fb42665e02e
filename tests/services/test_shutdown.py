"""SIGINT and SIGTERM stop `zmserve broker`, `zmserve worker` and `zmserve agent` with exit code 0 and their
children reaped; requests held by a stopping worker are answered, not left to their deadline: with SIGINT at once
(UNAVAILABLE), with SIGTERM after the worker has finished them (the drain); a second SIGINT forces the exit when
the clean one is stuck."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import (
    MATMUL_CONFIG,
    MLP_EXAMPLE,
    Exports,
    agent_pids,
    child_pids,
    load_example_module,
    log_events,
    wait_for,
    write_servable,
)
from zmserve.client import ClientError
from zmserve.local import LocalCluster

pytestmark = pytest.mark.slow

mlp = load_example_module(MLP_EXAMPLE / "export_model.py", "mlp_export_for_shutdown")
SLOW = {"batch": 256, "hidden": 1024, "ffn": 4096}
"""About 0.1 s per call on 2 cores: long enough that requests queue up behind each other."""
X = np.random.default_rng(3).standard_normal((SLOW["batch"], SLOW["hidden"])).astype(np.float32)


def start_time(pid: int) -> str | None:
    """A live process's start time (a pid alone may be reused); None once it is gone or a zombie (dead; this
    machine's init does not reap orphans)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def snapshot(pids: list[int]) -> dict[int, str]:
    return {pid: start for pid in pids if (start := start_time(pid)) is not None}


def all_gone(processes: dict[int, str]) -> bool:
    return all(start_time(pid) != start for pid, start in processes.items())


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> tuple[list[Path], Path, np.ndarray]:
    workdir = tmp_path_factory.mktemp("slow_mlp")
    model_files = exports.mlp(2, 1, *(f"--{k}={v}" for k, v in SLOW.items()))
    servable_dir = write_servable(workdir / "servables", "mlp", MATMUL_CONFIG.format(rank_size=2, stage_size=1))
    weights = mlp.make_weights(mlp.DEFAULT_LAYERS, SLOW["hidden"], SLOW["ffn"])
    return model_files, servable_dir, mlp.reference_forward(X, weights)


@pytest.fixture
def slow_cluster(tmp_path: Path, slow_model: tuple[list[Path], Path, np.ndarray]) -> Iterator[LocalCluster]:
    model_files, servable_dir, _ = slow_model
    cluster = LocalCluster(tmp_path, servable_dir, "mlp", model_files, standby=True)  # their reaping is tested
    try:
        cluster.wait_ready({"x": X})
        yield cluster
    finally:
        cluster.stop()


def outcome(future: concurrent.futures.Future, expected: np.ndarray) -> str:
    try:
        y = future.result(timeout=0)[0]["y"]
    except ClientError as error:
        return str(error.code)
    np.testing.assert_allclose(y, expected, atol=1e-4, rtol=0)
    return "OK"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_worker_launcher_and_broker_cleanly(
        slow_cluster: LocalCluster, slow_model: tuple[list[Path], Path, np.ndarray], signum: int) -> None:
    cluster, expected = slow_cluster, slow_model[2]
    worker, launcher, broker = (cluster.processes[name] for name in ("worker", "agents", "broker"))
    schedulers = snapshot(child_pids(worker.pid))  # the stage's scheduler, and its standby once started
    agents = snapshot(child_pids(launcher.pid))  # the agents, and their standbys once started
    assert 1 <= len(schedulers) <= 2 and len(agent_pids(launcher.pid)) == 2

    with cluster.client() as client:
        futures = [client.infer_async({"x": X}, timeout=60) for _ in range(8)]
        wait_for(lambda: any(f.done() for f in futures), timeout=30, what="a first answer")
        signalled = time.monotonic()
        os.kill(worker.pid, signum)
        assert worker.wait(timeout=20) == 0, cluster.log_tails()
        _, unanswered = concurrent.futures.wait(futures, timeout=10)
        assert not unanswered, "requests held by the stopped worker were left to their 60 s deadline"
        assert time.monotonic() - signalled < 10
        codes = [outcome(f, expected) for f in futures]
    if signum == signal.SIGINT:  # stop at once: what it holds is refused
        assert set(codes) <= {"OK", "UNAVAILABLE"} and "UNAVAILABLE" in codes, codes
    else:  # drain: what it holds is finished, and nothing new reached it meanwhile
        assert codes == ["OK"] * len(futures), codes
        (drained,) = log_events(cluster.logs["worker"], "drained")
        assert drained["why"] == "drained" and drained["held"] == 0, drained
    assert all_gone(schedulers), "the worker left its scheduler running"
    assert log_events(cluster.logs["worker"], "worker_stopped")

    agents.update(snapshot(child_pids(launcher.pid)))
    os.kill(launcher.pid, signum)
    assert launcher.wait(timeout=30) == 0, cluster.log_tails()
    assert all_gone(agents), "the launcher left agents running"
    assert log_events(cluster.logs["agents"], "launcher_stopped")

    os.kill(broker.pid, signum)
    assert broker.wait(timeout=10) == 0, cluster.log_tails()
    assert log_events(cluster.logs["broker"], "broker_stopped")


PTRACE_SEIZE = 0x4206
WAIT_ALL = 0x40000000
"""__WALL: wait for tracees that are not our children."""


def state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def hold_signals(pid: int) -> list[int]:
    """Trace every thread of `pid` with PTRACE_SEIZE (it keeps running). A signal then stops it for its tracer,
    this test, which never lets it go on: a child that does not die on SIGTERM, like one stuck in a syscall or
    in a handler. (A SIGSTOPped child would not do: the kernel ends a stopped process at once on a fatal
    signal.) Returns the traced thread ids."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    threads = [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    for tid in threads:
        if libc.ptrace(PTRACE_SEIZE, tid, None, None) != 0:
            raise OSError(ctypes.get_errno(), f"PTRACE_SEIZE {tid}")
    return threads


def release(pid: int, threads: list[int]) -> None:
    """SIGKILL a held process and collect the death of each traced thread (the tracer must)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    pending = set(threads)
    while pending and time.monotonic() < deadline:
        for tid in list(pending):
            try:
                if os.waitpid(tid, os.WNOHANG | WAIT_ALL)[0] == tid:
                    pending.discard(tid)
            except ChildProcessError:
                pending.discard(tid)
        time.sleep(0.02)


def test_second_sigint_forces_the_exit(tmp_path: Path, exports: Exports) -> None:
    """The worker's clean stop waits up to 2 s for its scheduler to die of SIGTERM, the launcher's up to 5 s for
    each agent; with a scheduler and an agent that cannot die of it, the second SIGINT ends both at once, with
    exit code 1."""
    model_files = exports.matmul(2)
    servable_dir = write_servable(tmp_path / "servables", "matmul", MATMUL_CONFIG.format(rank_size=2, stage_size=1))
    cluster = LocalCluster(tmp_path, servable_dir, "matmul", model_files)
    worker, launcher = cluster.processes["worker"], cluster.processes["agents"]

    def started(parent: int, module: str, count: int) -> list[int]:
        pids = [pid for pid in child_pids(parent) if f"-m {module}" in command_line(pid)]
        return sorted(pids) if len(pids) == count else []

    held: dict[int, list[int]] = {}
    try:
        scheduler = wait_for(lambda: started(worker.pid, "zmserve.collective", 1), timeout=60)[0]
        agents = wait_for(lambda: started(launcher.pid, "zmserve_services.agent.agent", 2), timeout=60)
        held = {pid: hold_signals(pid) for pid in (scheduler, agents[0])}
        os.kill(worker.pid, signal.SIGINT)
        os.kill(launcher.pid, signal.SIGINT)
        wait_for(lambda: all(state(pid) == "t" for pid in held), timeout=2, what="SIGTERM to reach the held children")
        assert worker.poll() is None and launcher.poll() is None, "the clean stop was not held up"
        second = time.monotonic()
        os.kill(worker.pid, signal.SIGINT)
        os.kill(launcher.pid, signal.SIGINT)
        assert worker.wait(timeout=5) == 1 and launcher.wait(timeout=5) == 1
        assert time.monotonic() - second < 1.5
        wait_for(lambda: state(agents[1]) in (None, "Z"), timeout=5, what="the other agent to die of its SIGTERM")
    finally:
        try:
            for pid, threads in held.items():
                release(pid, threads)
        finally:
            cluster.stop()
