"""The distributed API, as in `mindspore_serving.server.distributed`.

`declare_servable` is used inside servable_config.py; `start_servable` starts the distributed worker (in this
process, on a background thread); `startup_agents` starts and supervises this machine's agents (blocking).
"""

from __future__ import annotations

from zmserve.endpoints import DEFAULT_AGENT_START_PORT, DEFAULT_BROKER_WORKER_ADDRESS, DEFAULT_DISTRIBUTED_ADDRESS
from zmserve.security import PLAINTEXT, Security
from zmserve.servable import declare_servable
from zmserve.server.frontends import worker_started
from zmserve.server.running import run_in_background
from zmserve.supervision import handle_stop_signals

__all__ = ["declare_servable", "start_servable", "startup_agents"]


def start_servable(
    servable_directory: str,
    servable_name: str,
    rank_table_json_file: str | None = None,
    version_number: int = 1,
    distributed_address: str = DEFAULT_DISTRIBUTED_ADDRESS,
    wait_agents_time_in_seconds: float = 0,
    broker_address: str = DEFAULT_BROKER_WORKER_ADDRESS,
    security: Security = PLAINTEXT,
) -> None:
    """Load the servable and start its worker; the worker waits for its agents, then registers with the broker.

    A broken servable_config.py or rank table raises here, before anything starts. `security`: CURVE
    (`Security.load(secret_key, {Domain.AGENTS: folder}, {Peer.BROKER: broker_key})`, docs/SECURITY.md).
    """
    from zmserve_services.worker.config import WorkerConfig
    from zmserve_services.worker.worker import Worker

    worker = Worker(WorkerConfig(servable_directory, servable_name, version_number, rank_table_json_file,
                                 distributed_address, broker_address, wait_agents_time_in_seconds,
                                 security=security))
    run_in_background("worker", worker)
    worker_started(broker_address)


def startup_agents(
    distributed_address: str,
    model_files: list[str],
    group_config_files: list[str] | None = None,
    agent_start_port: int = DEFAULT_AGENT_START_PORT,
    agent_ip: str | None = None,
    rank_start: int | None = None,
    security: Security = PLAINTEXT,
) -> int:
    """Start one agent per model file on this machine and supervise them until SIGINT/SIGTERM (then 0).
    `security`: CURVE (`Security.load(secret_key, servers={Peer.WORKER: worker_key})`, docs/SECURITY.md).

    Raises `LauncherError` (a RuntimeError) saying why when the agents cannot serve, e.g. the worker refused a
    shard that does not fit its servable."""
    from zmserve_services.agent.launcher import AgentLauncher

    launcher = AgentLauncher(distributed_address, model_files, group_config_files, agent_start_port,
                             agent_ip, rank_start, security=security)
    handle_stop_signals(launcher.stop)
    return launcher.run()
