"""Which worker takes a request: the broker's routing rules, with no sockets.

1. The version: the one the request names, or for version 0 the newest version that has a ready worker. A version
   whose workers are still forming their groups (or draining) takes no traffic from a ready one, so a rollout moves
   version-0 traffic to version 2 only when one of its workers serves.
2. The worker: among the ready workers of that version, the one with the fewest requests outstanding (sent and not
   answered yet); ties are taken in turn, so even a single client's sequential calls spread over the replicas.

A worker is ready when its last WORKER_STATUS said so: it serves, and it is not draining.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from typing import TYPE_CHECKING

from zmserve.protocol import ErrorCode, ServingError

if TYPE_CHECKING:
    from zmserve_services.broker.broker import WorkerRecord


def ready_of_version(serving: list[WorkerRecord], servable: str, method: str, version: int) -> list[WorkerRecord]:
    """The ready workers of (servable, method, version) among `serving` (every worker of the servable, at least
    one), or the ServingError saying why there are none: NOT_FOUND for a version or method that does not exist,
    UNAVAILABLE (quoting the workers' reasons) when it exists but no worker of it is ready."""
    versions = sorted({w.version for w in serving})
    if version != 0 and version not in versions:
        raise ServingError(ErrorCode.NOT_FOUND, f"servable {servable!r} has no version {version}; versions: {versions}")
    if version == 0:
        ready_versions = {w.version for w in serving if w.ready}
        chosen = max(ready_versions) if ready_versions else versions[-1]
    else:
        chosen = version
    of_version = [w for w in serving if w.version == chosen]
    if method not in of_version[0].methods:
        raise ServingError(ErrorCode.NOT_FOUND, f"servable {servable!r} has no method {method!r}; methods: "
                                                f"{sorted(of_version[0].methods)}")
    ready = [w for w in of_version if w.ready]
    if not ready:
        waiting = serving if version == 0 else of_version
        reasons = "; ".join(sorted({f"version {w.version}: {w.reason}" if version == 0 else w.reason
                                    for w in waiting if w.reason}))
        raise ServingError(ErrorCode.UNAVAILABLE, f"servable {servable!r} is not ready: {reasons}")
    return ready


class LeastOutstanding:
    """The ready worker with the fewest requests outstanding; among equals, the next in turn."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, ready: list[WorkerRecord], exclude: Collection[bytes] = ()) -> WorkerRecord | None:
        """None when every ready worker is in `exclude` (the workers a retried request has been to)."""
        if len(ready) == 1 and not exclude:
            return ready[0]
        candidates = [w for w in ready if w.identity not in exclude] if exclude else ready
        if not candidates:
            return None
        start = next(self._turn) % len(candidates)
        best = candidates[start]
        for offset in range(1, len(candidates)):
            worker = candidates[(start + offset) % len(candidates)]
            if len(worker.inflight) < len(best.inflight):
                best = worker
        return best
