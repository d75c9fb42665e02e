"""The launcher's own line to the worker: how a launcher learns which of its agents the worker gave up on.

An agent inside MindSpore's `init()` holds the GIL while it waits for its group, so its control thread cannot act
on AGENT_SHUTDOWN, nor notice that the worker went silent; when its group can no longer form (a member died, the
worker restarted the stage's scheduler) it would wait there until its join watchdog fires (JOIN_TIMEOUT_S). The
launcher is another process. It says hello to the worker every heartbeat interval (LAUNCHER_HELLO), hears the
worker's heartbeats, and gets AGENTS_SHUT_DOWN on every restart: the launcher ends those of its agents that are
still running after the grace (`AgentLauncher.enforce`), and all of them when the worker falls silent, as their own
control threads would if they could run.
"""

from __future__ import annotations

import contextlib

import zmq

from zmserve.logs import get_logger
from zmserve.protocol import (
    AgentExited,
    AgentsShutDown,
    AgentStopped,
    Heartbeat,
    LauncherHello,
    ServingError,
    decode,
    encode,
)
from zmserve.security import Curve
from zmserve.transport import HeartbeatClock, Liveness, new_socket, read_pending

log = get_logger("launcher")


class LauncherLink:
    def __init__(self, context: zmq.Context, worker_address: str, hello: LauncherHello, heartbeat_interval: float,
                 heartbeat_liveness: int, curve: Curve | None = None) -> None:
        self.socket = new_socket(context, zmq.DEALER, curve=curve)
        self.socket.connect(worker_address)
        self.hello = encode(hello)
        self.hello_clock = HeartbeatClock(heartbeat_interval)
        self.worker = Liveness(heartbeat_interval, heartbeat_liveness)
        self.worker_heard = False
        self.worker_lost = False
        self.orders: list[AgentsShutDown] = []

    def exchange(self, now: float) -> tuple[list[AgentsShutDown], bool]:
        """Say hello when due and read what the worker said: its shutdown orders since the last call, and whether
        the worker has just gone silent (after having been heard)."""
        if self.hello_clock.due(now):
            with contextlib.suppress(zmq.Again):
                self.socket.send(self.hello, flags=zmq.NOBLOCK)
        read_pending(self.socket, self.handle)
        orders, self.orders = self.orders, []
        went_silent = False
        if self.worker_heard and self.worker.expired(now) != self.worker_lost:
            self.worker_lost = not self.worker_lost
            went_silent = self.worker_lost
            log.warning("worker_lost" if self.worker_lost else "worker_back")
        return orders, went_silent

    def agent_exited(self, rank: int, pid: int, why: str) -> None:
        """Tell the worker at once that an agent ended by itself (it restarts the agents without waiting for the
        silence of the agent's heartbeats)."""
        self.send(AgentExited(rank=rank, pid=pid, why=why))

    def send(self, message: AgentExited | AgentStopped) -> None:
        """Lost if the worker is not reachable, which the agents' missing heartbeats then cover."""
        with contextlib.suppress(zmq.Again):
            self.socket.send(encode(message), flags=zmq.NOBLOCK)

    def handle(self, frames: list[zmq.Frame]) -> None:
        self.worker.heard()
        self.worker_heard = True
        try:
            message = decode(frames[-1], AgentsShutDown, Heartbeat)
        except ServingError as error:
            log.warning("worker_message_malformed", message=error.message)
            return
        match message:
            case AgentsShutDown():
                self.orders.append(message)
            case Heartbeat():
                pass  # heard, above

    def close(self) -> None:
        self.socket.close(linger=500)  # AGENT_STOPPED notes sent just before still leave
