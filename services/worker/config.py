"""Everything a worker is told at start, in one place (the CLI, the Python API and tests all build one)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zmserve.endpoints import DEFAULT_BROKER_WORKER_ADDRESS, DEFAULT_DISTRIBUTED_ADDRESS
from zmserve.security import PLAINTEXT, Security
from zmserve.transport import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS
from zmserve_services.worker.defaults import (
    DRAIN_TIMEOUT_S,
    EXECUTION_TIMEOUT_S,
    MAX_BATCH_DELAY_S,
    MAX_BATCH_SIZE,
    MAX_INFLIGHT_MODEL_CALLS,
    MAX_QUEUED_REQUESTS,
    MAX_SEQUENCES,
)


@dataclass(frozen=True)
class WorkerConfig:
    servable_directory: str | Path
    """The folder that holds the servable's folder (the servable is `servable_directory/servable_name`)."""
    servable_name: str
    version_number: int = 1
    """The version served; 0 = the newest version folder of the servable (zmserve/versions.py)."""
    rank_table_file: str | Path | None = None
    distributed_address: str = DEFAULT_DISTRIBUTED_ADDRESS
    """Where agents register (host:port); the worker's data sockets bind on the same host."""
    broker_address: str | None = DEFAULT_BROKER_WORKER_ADDRESS
    """The broker's worker-facing address; None when the broker runs in the same process (`zmserve serve`)."""
    wait_agents_seconds: float = 0.0
    """Give up (exit) when not every rank registered within this many seconds; 0 waits forever."""
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    max_inflight_calls: int = MAX_INFLIGHT_MODEL_CALLS
    max_queued_requests: int = MAX_QUEUED_REQUESTS
    execution_timeout: float = EXECUTION_TIMEOUT_S
    max_batch_size: int = MAX_BATCH_SIZE
    max_batch_delay: float = MAX_BATCH_DELAY_S
    """Also how long a decode step waits for sequences still computing their next input (steps.py)."""
    max_sequences: int = MAX_SEQUENCES
    """Sequences (requests of a method whose stage calls a stateful model) held at once; more: RESOURCE_EXHAUSTED."""
    metrics: bool = False
    """Record Prometheus metrics (`zmserve worker` does unless `--metrics-bind off`; the Python API does not)."""
    drain_timeout: float = DRAIN_TIMEOUT_S
    """On SIGTERM: seconds to finish the requests held before stopping anyway (services/worker/drain.py)."""
    ready_file: str | Path | None = None
    """A file present while the worker serves (zmserve/readiness.py), for probes of process supervisors."""
    standby_schedulers: bool = True
    """Once serving, keep a standby scheduler per stage (services/worker/schedulers.py) for a fast restart."""
    security: Security = PLAINTEXT
    """CURVE on the link to the broker and on the agents' sockets, and MindSpore's TLS in the stage groups
    (zmserve/security.py)."""
