"""A worker's graceful stop (SIGTERM, what systemd and Kubernetes send): finish what it holds, take nothing new.

    SERVING --SIGTERM--> DRAINING --(broker acknowledged and nothing held) or --drain-timeout--> DONE
                               \\--drain timeout 0: DONE at once

While DRAINING the worker's status says `draining` (and not ready), so the broker routes it nothing more and
answers DRAIN_ACK. The ack travels behind every request the broker sent before it on the same connection, so a
worker that has the ack and holds no request is done: nothing is on its way to it. A worker whose broker is gone
(or that has none listening) cannot be sent more either, and needs no ack. At the timeout the worker stops the usual
way: what it still holds is answered UNAVAILABLE, and the broker sends the requests that had not reached the model
to another replica.

No sockets here: the worker asks `done` once per loop turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class DrainState(StrEnum):
    SERVING = "serving"
    DRAINING = "draining"
    DONE = "done"


@dataclass
class Drain:
    timeout: float
    """Seconds a drain may take before the worker stops anyway (0: stop at once)."""
    state: DrainState = DrainState.SERVING
    since: float = 0.0
    acknowledged: bool = False
    """The broker said it routes this worker nothing more (DRAIN_ACK)."""
    requested: bool = False
    """Set from a signal handler; `begin` is called from the loop."""

    def request(self) -> None:
        """Ask for a drain: only sets a flag, so it is safe in a signal handler."""
        self.requested = True

    @property
    def draining(self) -> bool:
        return self.state is DrainState.DRAINING

    def begin(self, now: float) -> bool:
        """Enter DRAINING if a drain was requested and has not begun; True when it begins now."""
        if not self.requested or self.state is not DrainState.SERVING:
            return False
        self.state, self.since = DrainState.DRAINING, now
        return True

    def done(self, now: float, held: int, broker_reachable: bool) -> str | None:
        """Why the drain is over (the worker stops now), or None while it goes on."""
        if self.state is not DrainState.DRAINING:
            return None
        why = None
        if self.timeout == 0:
            why = "no drain (drain timeout 0)"
        elif held == 0 and (self.acknowledged or not broker_reachable):
            why = "drained"
        elif now - self.since >= self.timeout:
            why = f"drain timeout ({self.timeout:g} s)"
        if why is not None:
            self.state = DrainState.DONE
        return why
