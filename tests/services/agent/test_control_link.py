"""The agent's control thread judges the worker's silence only on turns it could listen in.

MindSpore calls in an agent's main thread (ms.load of a 550 MB shard, graph compile, joining a group) hold the
GIL for seconds. The control thread could then find the worker "silent" while its heartbeats sat unread in the
socket, and end a healthy agent (seen with the 4 GiB examples/big_model: two of three cold starts restarted every
agent). Here the main thread holds the GIL in long C calls (builtin sum over a range) while a real ROUTER
heartbeats the link from another process; no MindSpore.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import zmq

from zmserve.protocol import Heartbeat, encode
from zmserve.transport import free_port

INTERVAL_S = 0.1
"""The link's heartbeat interval: it declares the worker lost after 3 x 0.1 s of silence."""

AGENT = f"""
import os, sys, time
import zmq
from zmserve_services.agent.agent import ControlLink
from zmserve.protocol import AgentRegister

link = ControlLink(zmq.Context(), sys.argv[1], 0, {INTERVAL_S}, 3)
link.start()
link.send(AgentRegister(rank=0, host="127.0.0.1", pid=os.getpid(), model_file="m", publish_address="tcp://x:1"))
deadline = time.monotonic() + 10
while not link.worker_heard:
    assert time.monotonic() < deadline, "never heard the worker"
    time.sleep(0.01)
n = 1 << 16
while True:  # one GIL-holding C call of at least twice the link's timeout
    started = time.monotonic()
    sum(range(n))
    if time.monotonic() - started > 6 * {INTERVAL_S}:
        break
    n *= 2
end = time.monotonic() + 6.0
while time.monotonic() < end:
    sum(range(n))
    time.sleep(0.001)
print("survived", flush=True)
os._exit(0)
"""


def run_agent_against_worker(heartbeat_for: float) -> subprocess.CompletedProcess:
    """A ROUTER that heartbeats every agent it heard for `heartbeat_for` seconds after it first hears one."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    address = f"tcp://127.0.0.1:{free_port()}"
    router.bind(address)
    stop = threading.Event()

    def worker() -> None:
        peers: set[bytes] = set()
        first_heard = None
        while not stop.is_set():
            if router.poll(20):
                peers.add(router.recv_multipart()[0])
                first_heard = first_heard or time.monotonic()
            if first_heard is not None and time.monotonic() - first_heard < heartbeat_for:
                for peer in peers:
                    router.send_multipart([peer, encode(Heartbeat())])

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        return subprocess.run([sys.executable, "-c", AGENT, address], capture_output=True, text=True, timeout=60)
    finally:
        stop.set()
        thread.join()
        router.close(linger=0)
        context.term()


@pytest.mark.slow
def test_a_starved_control_thread_does_not_declare_a_heartbeating_worker_lost() -> None:
    done = run_agent_against_worker(heartbeat_for=3600)
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_a_worker_that_falls_silent_is_still_declared_lost_while_the_main_thread_hogs() -> None:
    done = run_agent_against_worker(heartbeat_for=0.5)
    assert done.returncode == 3 and "survived" not in done.stdout  # EXIT_RESTART
    assert "worker_lost" in done.stderr
