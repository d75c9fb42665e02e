"""The agent launchers a worker hears from, so that a restart can make sure the agents it shut down are gone.

An agent inside MindSpore's `init()` holds the GIL while it waits for its group, so its control thread cannot act
on AGENT_SHUTDOWN; if its group can no longer form, it would wait there for good. Its launcher is another process:
each launcher says hello on a DEALER of its own (LAUNCHER_HELLO, every heartbeat interval), and on every restart
the worker tells every launcher it knows which agent processes it shut down (AGENTS_SHUT_DOWN); a launcher ends its
own that are still running after the grace (services/agent/launcher.py).
"""

from __future__ import annotations

from zmserve.logs import get_logger
from zmserve.protocol import LauncherHello
from zmserve.transport import Liveness

log = get_logger("worker")


class Launchers:
    def __init__(self, heartbeat_interval: float, heartbeat_liveness: int) -> None:
        self.heartbeat_interval, self.heartbeat_liveness = heartbeat_interval, heartbeat_liveness
        self.known: dict[bytes, Liveness] = {}

    def hello(self, identity: bytes, message: LauncherHello, now: float) -> None:
        if identity not in self.known:
            log.info("launcher_connected", host=message.host, pid=message.pid, ranks=message.ranks)
            self.known[identity] = Liveness(self.heartbeat_interval, self.heartbeat_liveness, now)
        self.known[identity].heard(now)

    def heard(self, identity: bytes, now: float) -> None:
        if identity in self.known:
            self.known[identity].heard(now)

    def alive(self, now: float) -> list[bytes]:
        """The launchers heard from within the liveness window (the others are forgotten)."""
        for identity in [i for i, liveness in self.known.items() if liveness.expired(now)]:
            del self.known[identity]
            log.info("launcher_lost")
        return list(self.known)
