"""A peer dies or stalls: clients are answered within their deadline, never left hanging, and the service comes
back by itself (or once the dead process is started again). Also: deadlines and the worker's queue bound."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import (
    MATMUL_CONFIG,
    MLP_EXAMPLE,
    Exports,
    agent_pids,
    agent_rank,
    child_pids,
    load_example_module,
    log_events,
    matmul_reference,
    wait_for,
    write_servable,
)
from zmserve.client import Client, ClientError
from zmserve.local import LocalCluster
from zmserve_services.agent.agent import JOIN_TIMEOUT_S

pytestmark = pytest.mark.slow

mlp = load_example_module(MLP_EXAMPLE / "export_model.py", "mlp_export_for_peer_death")
ONES = {"x": np.ones((128, 96), np.float32)}
SLOW = {"batch": 512, "hidden": 1024, "ffn": 4096}
"""About 0.25 s per call on 2 cores: longer than the deadline sweeps' period (the broker's and the worker's
loops look at deadlines every 0.1 s at least, the client's every 0.05 s)."""
SLOW_X = np.random.default_rng(4).standard_normal((SLOW["batch"], SLOW["hidden"])).astype(np.float32)
RECOVERY_S = 60.0


@dataclass
class Deployment:
    cluster: LocalCluster
    servable_dir: Path
    model_files: list[Path]

    def restart(self, name: str, args: list[str]) -> None:
        """Start `name` again with the same arguments, keeping the dead process's log next to the new one."""
        self.cluster.processes[name].wait(timeout=10)
        log = self.cluster.logs[name]
        log.rename(log.with_suffix(".before.log"))
        self.cluster.start(name, args)


@pytest.fixture(scope="module")
def matmul_model(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> tuple[Path, list[Path]]:
    workdir = tmp_path_factory.mktemp("matmul_peer_death")
    model_files = exports.matmul(2)
    return write_servable(workdir / "servables", "matmul", MATMUL_CONFIG.format(rank_size=2, stage_size=1)), \
        model_files


@pytest.fixture
def deployment(tmp_path: Path, matmul_model: tuple[Path, list[Path]]) -> Iterator[Deployment]:
    servable_dir, model_files = matmul_model
    cluster = LocalCluster(tmp_path, servable_dir, "matmul", model_files, standby=True)  # restarts are timed
    try:
        cluster.wait_ready(ONES)
        yield Deployment(cluster, servable_dir, model_files)
    finally:
        cluster.stop()


def serves_correctly(client: Client) -> bool:
    """One request: True if answered correctly, False if the service is not back yet."""
    x = np.random.default_rng().standard_normal((128, 96)).astype(np.float32)
    try:
        y = client.infer({"x": x}, timeout=5)[0]["y"]
    except ClientError as error:
        assert error.code in ("UNAVAILABLE", "NOT_FOUND", "DEADLINE_EXCEEDED"), error
        return False
    np.testing.assert_allclose(y, matmul_reference(x), atol=1e-5, rtol=0)
    return True


def running(pid: int) -> bool:
    """Alive and not a zombie (this machine's init does not reap orphans)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def event_time(record: dict) -> float:
    """A log line's timestamp on the wall clock (time.time)."""
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def timed(futures: list[concurrent.futures.Future]) -> list[float]:
    """For each future, when it resolves (time.monotonic); filled in by callbacks."""
    times = [0.0] * len(futures)
    for index, future in enumerate(futures):
        future.add_done_callback(lambda _, i=index: times.__setitem__(i, time.monotonic()))
    return times


def code_of(future: concurrent.futures.Future) -> str:
    try:
        future.result(timeout=0)
    except ClientError as error:
        return str(error.code)
    return "OK"


def worker_args(deployment: Deployment) -> list[str]:
    cluster = deployment.cluster
    return ["worker", "--servable-dir", str(deployment.servable_dir), "--servable", "matmul",
            "--distributed-address", cluster.distributed_address, "--broker", cluster.worker_address]


def requests_around_a_worker_loss(client: Client) -> tuple[list[concurrent.futures.Future], list[float]]:
    """Four requests with a 10 s timeout and one with 1 s, sent just after the worker stopped answering."""
    futures = [client.infer_async(ONES, timeout=10) for _ in range(4)] + [client.infer_async(ONES, timeout=1)]
    return futures, timed(futures)


def test_killed_worker_is_removed_and_a_restarted_one_serves(deployment: Deployment) -> None:
    """Requests held by a worker that is SIGKILLed are answered UNAVAILABLE as soon as the broker's next send
    to it fails (EHOSTUNREACH), at most a heartbeat interval after the kill; later ones get UNAVAILABLE too (not
    NOT_FOUND: the servable was served and will be again) until a worker registers again. The worker is frozen
    first so that the requests are surely in its hands."""
    cluster = deployment.cluster
    agents = set(agent_pids(cluster.processes["agents"].pid))
    worker = cluster.processes["worker"]
    with cluster.client() as client:
        os.kill(worker.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        futures, resolved = requests_around_a_worker_loss(client)
        wait_for(futures[4].done, timeout=2, what="the 1 s request's answer")
        assert code_of(futures[4]) == "DEADLINE_EXCEEDED" and resolved[4] - frozen_at < 1.2
        killed_at, killed_wall = time.monotonic(), time.time()
        os.kill(worker.pid, signal.SIGKILL)
        done, _ = concurrent.futures.wait(futures, timeout=12)
        assert len(done) == len(futures), "a request outlived its deadline"
        assert [code_of(f) for f in futures[:4]] == ["UNAVAILABLE"] * 4
        removed = log_events(cluster.logs["broker"], "worker_removed")
        assert len(removed) == 1 and removed[0]["why"] == "worker connection closed", removed
        noticed = event_time(removed[0]) - killed_wall
        print(f"the broker removed the killed worker {noticed:.2f} s after the kill")
        assert noticed < 1.5
        assert all(resolved[i] - killed_at < noticed + 0.5 for i in range(4)), resolved
        with pytest.raises(ClientError) as caught:
            client.infer(ONES, timeout=5)
        assert caught.value.code == "UNAVAILABLE", caught.value

        deployment.restart("worker", worker_args(deployment))
        restarted_at = time.monotonic()
        wait_for(lambda: serves_correctly(client), timeout=RECOVERY_S, interval=0.2, what="serving again",
                 details=cluster.log_tails)
    print(f"serving {time.monotonic() - restarted_at:.1f} s after the worker restarted")
    assert len(log_events(cluster.logs["broker"], "worker_registered")) == 2
    registered = {e["agent_rank"] for e in log_events(cluster.logs["worker"], "agent_registered")}
    assert registered == {0, 1}
    assert not agents & set(agent_pids(cluster.processes["agents"].pid)), "agents must re-join as new processes"


def test_frozen_worker_is_removed_after_its_heartbeats_stop_and_returns(deployment: Deployment) -> None:
    """SIGSTOP keeps the connection open, so only the missing heartbeats tell: removed after 3 s. Resumed, the
    worker's next WORKER_STATUS registers it again, and it re-forms its agents (they left it for dead)."""
    cluster = deployment.cluster
    worker = cluster.processes["worker"]
    with cluster.client() as client:
        frozen_at, frozen_wall = time.monotonic(), time.time()
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            futures, resolved = requests_around_a_worker_loss(client)
            done, _ = concurrent.futures.wait(futures, timeout=12)
            assert len(done) == len(futures), "a request outlived its deadline"
            removed = log_events(cluster.logs["broker"], "worker_removed")
            assert len(removed) == 1 and removed[0]["why"].startswith("no heartbeat"), removed
            noticed = event_time(removed[0]) - frozen_wall
            print(f"the broker removed the frozen worker after {noticed:.2f} s")
            assert 3.0 <= noticed < 4.0
            codes = [code_of(f) for f in futures]
            assert codes == ["UNAVAILABLE"] * 4 + ["DEADLINE_EXCEEDED"], codes
            assert all(resolved[i] - frozen_at < noticed + 0.5 for i in range(4)), resolved
            assert resolved[4] - frozen_at < 1.2
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        wait_for(lambda: serves_correctly(client), timeout=RECOVERY_S, interval=0.2, what="serving again",
                 details=cluster.log_tails)
    print(f"serving {time.monotonic() - resumed_at:.1f} s after the worker resumed")
    assert len(log_events(cluster.logs["broker"], "worker_registered")) == 2
    cluster.check_alive()


def test_killed_broker_means_deadline_exceeded_and_a_restarted_one_is_found(deployment: Deployment) -> None:
    cluster = deployment.cluster
    with cluster.client() as client:
        assert serves_correctly(client)
        os.kill(cluster.processes["broker"].pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(ClientError) as caught:
            client.infer(ONES, timeout=2)
        assert caught.value.code == "DEADLINE_EXCEEDED"
        assert 2.0 <= time.monotonic() - started < 2.5

        deployment.restart("broker", ["broker", "--bind", cluster.client_address,
                                      "--worker-bind", cluster.worker_address])
        restarted_at = time.monotonic()
        wait_for(lambda: serves_correctly(client), timeout=RECOVERY_S, interval=0.2, what="serving again",
                 details=cluster.log_tails)
        back = time.monotonic() - restarted_at
    print(f"serving {back:.1f} s after the broker restarted")
    assert back < 10, "the worker repeats its status every second; the new broker should learn it at once"
    assert log_events(cluster.logs["broker"], "worker_registered")
    cluster.check_alive()


def test_frozen_agent_does_not_hang_clients(deployment: Deployment) -> None:
    """SIGSTOP one agent: its heartbeats stop (the worker restarts the agents), the launcher kills the frozen
    process, and every request meanwhile is answered within its deadline."""
    cluster = deployment.cluster
    launcher = cluster.processes["agents"].pid
    frozen = agent_pids(launcher)[1]
    outcomes: list[tuple[str, float, float]] = []
    stop = threading.Event()

    def load() -> None:
        with cluster.client() as client:
            while not stop.is_set():
                started = time.monotonic()
                future = client.infer_async(ONES, timeout=3)
                try:
                    future.result(timeout=3 + 2)
                    code = "OK"
                except ClientError as error:
                    code = str(error.code)
                except concurrent.futures.TimeoutError:
                    code = "HUNG"
                outcomes.append((code, started, time.monotonic()))
                stop.wait(0.05)

    thread = threading.Thread(target=load, daemon=True)
    frozen_at = time.monotonic()
    os.kill(frozen, signal.SIGSTOP)
    thread.start()
    try:
        wait_for(lambda: log_events(cluster.logs["worker"], "agent_lost"), timeout=5, what="agent_lost")
        wait_for(lambda: log_events(cluster.logs["agents"], "agent_frozen"), timeout=10, what="agent_frozen")
        wait_for(lambda: any(c == "OK" and s > frozen_at for c, s, _ in outcomes), timeout=RECOVERY_S,
                 what="serving again", details=cluster.log_tails)
    finally:
        stop.set()
        thread.join(timeout=10)
        if frozen in child_pids(launcher):
            os.kill(frozen, signal.SIGCONT)
    back = next(end for code, start, end in outcomes if code == "OK" and start > frozen_at) - frozen_at
    print(f"serving {back:.1f} s after the agent froze")
    codes = {code for code, _, _ in outcomes}
    assert codes <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, codes
    assert all(end - start < 3.5 for _, start, end in outcomes), "a request was answered after its deadline"
    assert frozen not in child_pids(launcher)


def test_killed_launcher_takes_its_agents_and_a_new_one_serves(deployment: Deployment) -> None:
    cluster = deployment.cluster
    launcher = cluster.processes["agents"]
    agents = child_pids(launcher.pid)
    os.kill(launcher.pid, signal.SIGKILL)
    with cluster.client() as client:
        wait_for(lambda: not any(running(pid) for pid in agents), timeout=5, what="the agents to die with it")
        wait_for(lambda: log_events(cluster.logs["worker"], "agent_lost"), timeout=5, what="agent_lost")
        started = time.monotonic()
        with pytest.raises(ClientError) as caught:
            client.infer(ONES, timeout=5)
        assert caught.value.code == "UNAVAILABLE" and time.monotonic() - started < 1
        launcher.wait(timeout=10)
        cluster.logs["agents"].rename(cluster.logs["agents"].with_suffix(".before.log"))
        cluster.start_agents("agents", deployment.model_files)
        restarted_at = time.monotonic()
        wait_for(lambda: serves_correctly(client), timeout=RECOVERY_S, interval=0.2, what="serving again",
                 details=cluster.log_tails)
    print(f"serving {time.monotonic() - restarted_at:.1f} s after the new launcher started")
    cluster.check_alive()


@pytest.fixture(scope="module")
def slow_cluster(tmp_path_factory: pytest.TempPathFactory, exports: Exports
                 ) -> Iterator[tuple[LocalCluster, np.ndarray]]:
    """The MLP, slowed to about 0.25 s a call; the worker holds at most 2 requests."""
    workdir = tmp_path_factory.mktemp("slow_mlp_peer_death")
    model_files = exports.mlp(2, 1, *(f"--{k}={v}" for k, v in SLOW.items()))
    servable_dir = write_servable(workdir / "servables", "mlp", MATMUL_CONFIG.format(rank_size=2, stage_size=1))
    expected = mlp.reference_forward(SLOW_X, mlp.make_weights(mlp.DEFAULT_LAYERS, SLOW["hidden"], SLOW["ffn"]))
    cluster = LocalCluster(workdir, servable_dir, "mlp", model_files, ["--max-queued", "2"])
    try:
        cluster.wait_ready({"x": SLOW_X})
        yield cluster, expected
    finally:
        cluster.stop()


@pytest.mark.parametrize("timeout", [0.001, 0.05])
def test_deadline_shorter_than_the_model_is_exceeded(slow_cluster: tuple[LocalCluster, np.ndarray],
                                                     timeout: float) -> None:
    cluster, expected = slow_cluster
    with cluster.client() as client:
        started = time.monotonic()
        with pytest.raises(ClientError) as caught:
            client.infer({"x": SLOW_X}, timeout=timeout)
        assert caught.value.code == "DEADLINE_EXCEEDED"
        assert time.monotonic() - started < timeout + 0.2
        y = client.infer({"x": SLOW_X}, timeout=30)[0]["y"]
    np.testing.assert_allclose(y, expected, atol=1e-4, rtol=0)


def test_requests_beyond_the_queue_bound_are_refused_at_once(slow_cluster: tuple[LocalCluster, np.ndarray]) -> None:
    cluster, expected = slow_cluster
    with cluster.client() as client:
        sent = time.monotonic()
        futures = [client.infer_async({"x": SLOW_X}, timeout=30) for _ in range(10)]
        resolved = timed(futures)
        done, _ = concurrent.futures.wait(futures, timeout=40)
        assert len(done) == len(futures)
    codes = [code_of(f) for f in futures]
    ok = [i for i, code in enumerate(codes) if code == "OK"]
    refused = [i for i, code in enumerate(codes) if code == "RESOURCE_EXHAUSTED"]
    assert len(ok) + len(refused) == len(futures), codes
    assert len(ok) >= 2 and len(refused) >= 5, codes
    assert max(resolved[i] for i in refused) < min(resolved[i] for i in ok), "a refusal waited for a model call"
    for i in ok:
        np.testing.assert_allclose(futures[i].result()[0]["y"], expected, atol=1e-4, rtol=0)
    print(f"{len(ok)} admitted, {len(refused)} refused within {max(resolved[i] for i in refused) - sent:.3f} s, "
          f"first result after {min(resolved[i] for i in ok) - sent:.3f} s")


def test_reply_after_the_deadline_is_not_a_success(deployment: Deployment) -> None:
    """MatMul answers in about 3 ms, so with a 1 ms timeout every answer comes after the deadline: it must be
    DEADLINE_EXCEEDED even when it arrives before the broker's or the client's next deadline sweep."""
    with deployment.cluster.client() as client:
        codes = []
        for _ in range(20):
            try:
                client.infer(ONES, timeout=0.001)
                codes.append("OK")
            except ClientError as error:
                codes.append(str(error.code))
    assert set(codes) == {"DEADLINE_EXCEEDED"}, codes


def connected_to(pid: int, port: int) -> bool:
    """`pid` holds an established TCP connection to 127.0.0.1:`port` (read from /proc)."""
    try:
        inodes = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:
        return False
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[3] == "01" and f"socket:[{fields[9]}]" in inodes:
            return True
    return False


RECOVERY_FROM_ANY_PHASE_S = 15.0


def test_agent_lost_while_its_group_forms_is_recovered(tmp_path: Path, matmul_model: tuple[Path, list[Path]]) -> None:
    """Rank 1 dies during group formation, and its launcher is held (SIGSTOP) until rank 0 is inside init()
    (connected to the stage's scheduler). The replacement's registration then makes the worker restart the
    agents. Rank 0 cannot act on the shutdown: init() holds the GIL while it waits for a group that will never
    form. Before the join watchdog it never left and the servable stayed down for good; with the watchdog alone it
    came back JOIN_TIMEOUT_S later. Now the worker names rank 0's process to its launcher (AGENTS_SHUT_DOWN), which
    ends it after the grace: serving again within 15 s of the restart."""
    servable_dir, model_files = matmul_model
    cluster = LocalCluster(tmp_path, servable_dir, "matmul", model_files, standby=True)  # restarts are timed
    launcher = cluster.processes["agents"].pid

    def agent_of_rank(rank: int) -> int | None:
        return next((pid for pid in child_pids(launcher) if agent_rank(pid) == rank), None)

    try:
        forming = wait_for(lambda: log_events(cluster.logs["worker"], "forming_groups"), timeout=60,
                           details=cluster.log_tails)
        scheduler_port = int(forming[0]["schedulers"][0].rsplit(":", 1)[1])
        os.kill(launcher, signal.SIGSTOP)
        try:
            os.kill(wait_for(lambda: agent_of_rank(1), timeout=5), signal.SIGKILL)
            rank0 = wait_for(lambda: agent_of_rank(0), timeout=5)
            wait_for(lambda: connected_to(rank0, scheduler_port), timeout=60, what="rank 0 inside init()")
        finally:
            os.kill(launcher, signal.SIGCONT)
        restarted = wait_for(lambda: log_events(cluster.logs["worker"], "agent_lost"), timeout=10,
                             what="the restart")
        with cluster.client() as client:
            wait_for(lambda: serves_correctly(client), timeout=JOIN_TIMEOUT_S + 60, interval=0.2,
                     what="serving again", details=cluster.log_tails)
        back = time.time() - event_time(restarted[0])
    finally:
        cluster.stop()
    print(f"serving {back:.1f} s after the restart that rank 0 could not act on")
    ended = [e for e in log_events(cluster.logs["agents"], "agent_ended") if e.get("agent_rank") == 0]
    assert ended and ended[0]["pid"] == rank0, "rank 0's launcher should have ended it"
    assert "did not exit within" in ended[0]["why"], ended[0]
    assert not [e for e in log_events(cluster.logs["agents"], "agent_crashed") if e.get("agent_rank") == 0], \
        "the join watchdog should not have had to fire"
    assert back <= RECOVERY_FROM_ANY_PHASE_S, f"serving again only {back:.1f} s after the restart"
