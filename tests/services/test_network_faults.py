"""Faults on the links between hosts, for real: the 2-stage MLP (PP2 x TP2) with its stages on two other hosts
(network namespaces, tests/netns.py), under steady load, while the links between the worker and stage 1's host
and between the two stages get 20 ms of latency, 5% loss, a link down for 1 s, a link down for 10 s, and a
partition of 10 s.

Results stay correct throughout (every answer is checked against the unsharded numpy forward pass); a request
past its deadline is answered DEADLINE_EXCEEDED; nothing hangs. What is shorter than the liveness window (3 s) is
ridden out: no agent is lost. A link down for longer makes the worker restart the agents, and the servable
serves again once the link is back.

This kernel has no netem (CONFIG_NET_SCH_NETEM is not set), so latency is an NFQUEUE that holds each packet
(tests/netdelay.py) and loss is iptables' statistic match; both between two hosts, in both directions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from tests.cluster import MATMUL_CONFIG, REPO, Exports, log_events, wait_for, write_servable
from tests.netns import ADDRESS, Hosts, skip_reason, three_hosts
from zmserve.supervision import reap

pytestmark = pytest.mark.slow

BROKER = "tcp://127.0.0.1:15500"
"""Inside the server namespace, which is new and empty: no other process can hold the port."""
NETLOAD = REPO / "tests" / "netload.py"
LIVENESS_S = 3.0
Request = tuple[float, float, str]


@dataclass
class Deployment:
    hosts: Hosts
    logs: dict[str, Path]
    processes: dict[str, subprocess.Popen]

    def load(self, duration: float, timeout: float, clients: int = 2) -> list[Request]:
        """Requests sent from the server's namespace for `duration` s: (sent, done, code), seconds from start."""
        done = subprocess.run([*self.hosts.exec("server"), sys.executable, str(NETLOAD), BROKER, "--duration",
                               str(duration), "--timeout", str(timeout), "--clients", str(clients)],
                              capture_output=True, text=True, timeout=duration + timeout + 60)
        assert done.returncode == 0, done.stderr[-3000:]
        return [tuple(r) for r in json.loads(done.stdout.strip().splitlines()[-1])]

    def start_load(self, duration: float, timeout: float, clients: int = 2) -> subprocess.Popen:
        return subprocess.Popen([*self.hosts.exec("server"), sys.executable, str(NETLOAD), BROKER, "--duration",
                                 str(duration), "--timeout", str(timeout), "--clients", str(clients)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_serving(self, timeout: float = 240.0) -> float:
        """Poll until a request succeeds; seconds it took."""
        started = time.monotonic()
        wait_for(lambda: any(code == "OK" for *_, code in self.load(0.5, 2.0, clients=1)), timeout=timeout,
                 interval=0.1, what="serving", details=self.log_tails)
        return time.monotonic() - started

    def lost_since(self, moment: float) -> list[dict]:
        return [e for e in log_events(self.logs["worker"], "agent_lost") if wall(e) >= moment]

    def log_tails(self) -> str:
        return "\n".join(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-15:])
                         for name, path in self.logs.items())


def wall(record: dict) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def finished(load: subprocess.Popen) -> list[Request]:
    stdout, stderr = load.communicate(timeout=120)
    assert load.returncode == 0, stderr[-3000:]
    return [tuple(r) for r in json.loads(stdout.strip().splitlines()[-1])]


def check_answers(requests: list[Request], timeout: float, allowed: set[str]) -> Counter:
    """Every request answered, correctly or with an allowed code, and never long after its deadline."""
    codes = Counter(code for *_, code in requests)
    assert requests and set(codes) <= allowed, codes
    late = [(sent, done) for sent, done, _ in requests if done - sent > timeout + 0.5]
    assert not late, f"answered after the deadline: {late[:5]}"
    return codes


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> Iterator[Deployment]:
    reason = skip_reason(faults=True)
    if reason is not None:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("network_faults")
    model_files = exports.mlp(4, 2)
    servable_dir = write_servable(workdir / "servables", "mlp", MATMUL_CONFIG.format(rank_size=4, stage_size=2))
    distributed = f"{ADDRESS['server']}:6200"
    commands = {
        "broker": ("server", ["broker", "--bind", BROKER, "--worker-bind", "tcp://127.0.0.1:15501"]),
        "worker": ("server", ["worker", "--servable-dir", str(servable_dir), "--servable", "mlp",
                              "--distributed-address", distributed, "--broker", "tcp://127.0.0.1:15501"]),
        "host_a": ("host_a", ["agent", "--worker", distributed, "--agent-ip", ADDRESS["host_a"], "--rank-start",
                              "0", "--model-files", f"{model_files[0]},{model_files[1]}"]),
        "host_b": ("host_b", ["agent", "--worker", distributed, "--agent-ip", ADDRESS["host_b"], "--rank-start",
                              "2", "--model-files", f"{model_files[2]},{model_files[3]}"]),
    }
    with three_hosts() as hosts:
        processes: dict[str, subprocess.Popen] = {}
        logs = {name: workdir / f"{name}.log" for name in commands}
        deployment = Deployment(hosts, logs, processes)
        try:
            for name, (role, args) in commands.items():
                processes[name] = subprocess.Popen(
                    [*hosts.exec(role), sys.executable, "-m", "zmserve.cli", "--log-level", "debug", *args],
                    stdout=subprocess.DEVNULL, stderr=logs[name].open("w"), env={**os.environ, "GLOG_v": "3"})
            deployment.wait_serving()
            yield deployment
        finally:
            hosts.heal()
            codes = {name: reap(process, timeout=20) for name, process in processes.items()}
        assert set(codes.values()) == {0}, codes


@pytest.fixture
def healed(deployment: Deployment) -> Iterator[Deployment]:
    """Each test starts serving on healthy links and leaves them healthy."""
    deployment.wait_serving()
    try:
        yield deployment
    finally:
        deployment.hosts.heal()


def test_20ms_latency_keeps_results_correct_and_expires_shorter_deadlines(healed: Deployment) -> None:
    hosts, started = healed.hosts, time.time()
    hosts.delay("server", "host_b", 20)
    hosts.delay("host_a", "host_b", 20)
    codes = check_answers(healed.load(6.0, timeout=2.0), 2.0, {"OK"})
    # worker -> stage 0 (not delayed) -> stage 1 (+20 ms) -> worker (+20 ms): no answer can come within 30 ms
    expired = check_answers(healed.load(2.0, timeout=0.03), 0.03, {"DEADLINE_EXCEEDED"})
    assert not healed.lost_since(started)
    print(f"with 20 ms each way: {dict(codes)}; 30 ms deadline: {dict(expired)}")


def test_5_percent_loss_keeps_results_correct(healed: Deployment) -> None:
    hosts, started = healed.hosts, time.time()
    hosts.loss("server", "host_b", 5)
    hosts.loss("host_a", "host_b", 5)
    codes = check_answers(healed.load(8.0, timeout=5.0), 5.0, {"OK"})
    assert not healed.lost_since(started), "TCP retransmits what is lost: no heartbeat may go missing for 3 s"
    print(f"with 5% loss each way: {dict(codes)}")


def test_a_link_down_shorter_than_the_liveness_window_is_ridden_out(healed: Deployment) -> None:
    hosts, started = healed.hosts, time.time()
    load = healed.start_load(6.0, timeout=2.0)
    time.sleep(2.0)  # the load runs on healthy links first
    hosts.link_down("host_b")
    time.sleep(1.0)  # the fault's own length
    hosts.link_up("host_b")
    codes = check_answers(finished(load), 2.0, {"OK", "DEADLINE_EXCEEDED"})
    assert not healed.lost_since(started), "a 1 s blip is shorter than the 3 s liveness window"
    print(f"host_b's link down for 1 s: {dict(codes)}")


def test_a_link_down_for_10_s_restarts_the_agents_and_serves_again(healed: Deployment) -> None:
    hosts, started = healed.hosts, time.time()
    load = healed.start_load(14.0, timeout=2.0)
    time.sleep(2.0)
    hosts.link_down("host_b")
    time.sleep(10.0)
    hosts.link_up("host_b")
    up = time.monotonic()
    codes = check_answers(finished(load), 2.0, {"OK", "DEADLINE_EXCEEDED", "UNAVAILABLE"})
    assert codes["DEADLINE_EXCEEDED"], f"requests held while the link was down must expire: {codes}"
    lost = healed.lost_since(started)
    assert lost and lost[0]["why"].startswith("no heartbeat"), lost
    healed.wait_serving(120.0)
    back = time.monotonic() - up
    print(f"host_b's link down for 10 s: {dict(codes)}; agent lost {wall(lost[0]) - started:.1f} s in; serving "
          f"again within {back:.1f} s of the link coming back")


def test_a_10_s_partition_between_the_stages_is_ridden_out(healed: Deployment) -> None:
    """Both stages still hear the worker, so no agent is lost; calls stall between the stages, their requests
    expire, and TCP delivers what waited once the partition heals."""
    hosts, started = healed.hosts, time.time()
    load = healed.start_load(12.0, timeout=2.0)
    time.sleep(1.0)
    hosts.partition("host_a", "host_b")
    time.sleep(10.0)
    hosts.heal()
    healed_at = time.monotonic()
    codes = check_answers(finished(load), 2.0, {"OK", "DEADLINE_EXCEEDED"})
    assert codes["DEADLINE_EXCEEDED"], codes
    assert not healed.lost_since(started), "the partition cut no agent off from the worker"
    healed.wait_serving(60.0)
    print(f"stages partitioned for 10 s: {dict(codes)}; serving {time.monotonic() - healed_at:.1f} s after the "
          f"partition healed")
