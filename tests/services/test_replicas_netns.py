"""Two replicas of one servable on two hosts, behind one broker, for real: network namespaces joined by veth.

  ns "server"  10.231.0.1  broker (clients and workers on 10.231.0.1) + the clients
  ns "host_a"  10.231.0.2  replica A: worker (distributed address 10.231.0.2) + its 2 agents
  ns "host_b"  10.231.0.3  replica B: worker (distributed address 10.231.0.3) + its 2 agents

Six clients call without pause, asking for `until_result` retries. Replica A's worker is SIGKILLed under that load:
the requests it held, queued or in its model, are sent to B and answered there (the broker's `worker_removed` line
says A held some, so A was taking work when it died); new requests go to B; no client sees an error or a wrong
result. B then drains on SIGTERM and says how many requests it ran.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import MATMUL_CONFIG, REPO, Exports, log_events, wait_for, write_servable
from tests.netns import address, hosts, in_namespace
from zmserve.supervision import reap

pytestmark = pytest.mark.slow

BROKER = address(0)


class LoadProcess:
    """tests/steady_load.py inside a namespace: its counts as they come, its outcomes when stopped."""

    def __init__(self, namespace: str, *args: str) -> None:
        self.process = subprocess.Popen(
            in_namespace(namespace, [sys.executable, str(REPO / "tests" / "steady_load.py"), *args]),
            stdout=subprocess.PIPE, text=True, env={**os.environ, "GLOG_v": "3"})
        self.counts: dict[str, int] = {}
        self.outcomes: list[dict] | None = None
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            document = json.loads(line)
            if "counts" in document:
                self.counts = document["counts"]
            else:
                self.outcomes = document["outcomes"]

    def answered(self) -> int:
        return sum(self.counts.values())

    def stop(self) -> list[dict]:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0
        self.reader.join(timeout=10)
        assert self.outcomes is not None
        return self.outcomes


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    with hosts("server", "host_a", "host_b") as names:
        yield names


def test_a_killed_replica_loses_no_request_and_the_other_takes_its_work(
        tmp_path: Path, namespaces: dict[str, str], exports: Exports) -> None:
    model_files = exports.matmul(2)
    servable_dir = write_servable(tmp_path / "servables", "matmul", MATMUL_CONFIG.format(rank_size=2, stage_size=1))
    files = ",".join(str(path) for path in model_files)
    commands = {"broker": ("server", ["broker", "--bind", f"tcp://{BROKER}:5500", "--worker-bind",
                                      f"tcp://{BROKER}:5501"])}
    for replica, index in (("a", 1), ("b", 2)):
        host = address(index)
        commands[f"worker_{replica}"] = (f"host_{replica}", [
            "worker", "--servable-dir", str(servable_dir), "--servable", "matmul", "--broker",
            f"tcp://{BROKER}:5501", "--distributed-address", f"{host}:6200"])
        commands[f"agents_{replica}"] = (f"host_{replica}", [
            "agent", "--worker", f"{host}:6200", "--agent-ip", host, "--model-files", files])
    processes: dict[str, subprocess.Popen] = {}
    logs = {name: tmp_path / f"{name}.log" for name in commands}

    def tails() -> str:
        return "\n".join(f"--- {n}\n" + path.read_text()[-2500:] for n, path in logs.items() if path.exists())

    load = None
    try:
        for name, (namespace, args) in commands.items():
            processes[name] = subprocess.Popen(
                in_namespace(namespaces[namespace], [sys.executable, "-m", "zmserve.cli", *args]),
                stdout=subprocess.DEVNULL, stderr=logs[name].open("w"), env={**os.environ, "GLOG_v": "3"})
        wait_for(lambda: all(log_events(logs[f"worker_{r}"], "serving") for r in "ab"), timeout=300,
                 what="both replicas to serve", details=tails)

        load = LoadProcess(namespaces["server"], f"tcp://{BROKER}:5500", "--clients", "6",
                           "--retry", "until_result")
        wait_for(lambda: load.answered() >= 200, timeout=120, what="200 answers under load", details=tails)
        processes["worker_a"].send_signal(signal.SIGKILL)
        killed, answered_at_kill = time.monotonic(), load.answered()
        wait_for(lambda: load.answered() >= answered_at_kill + 200, timeout=120,
                 what="200 more answers from replica B alone", details=tails)
        outcomes = load.stop()
        load = None
        seconds_to_recover = max((o["answered"] - o["sent"] for o in outcomes if o["sent"] <= killed + 5),
                                 default=0.0)

        worker_b = processes.pop("worker_b")
        worker_b.send_signal(signal.SIGTERM)
        assert worker_b.wait(timeout=60) == 0, tails()
    finally:
        if load is not None:
            load.process.kill()
        codes = {name: reap(process, timeout=20) for name, process in processes.items()}

    kinds = {o["what"] for o in outcomes}
    assert kinds == {"w=0.5"}, f"every answer a correct result, none an error: {kinds}\n{tails()}"
    (removed,) = [e for e in log_events(logs["broker"], "worker_removed") if e["why"] != "worker disconnected"]
    assert removed["inflight"] > 0, removed  # A held requests when it died: it was taking its share
    retried = log_events(logs["broker"], "request_retried")
    assert retried, "the requests A held were not sent to B"
    (stopped,) = log_events(logs["worker_b"], "worker_stopped")
    assert stopped["requests"] > 0
    assert codes["broker"] == 0 and codes["agents_b"] == 0, codes
    print(f"replicas: {len(outcomes)} requests, all correct; A held {removed['inflight']} when killed, "
          f"removed for: {removed['why']}; B ran {stopped['requests']}; slowest answer around the kill "
          f"{seconds_to_recover:.2f} s")
