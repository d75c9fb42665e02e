"""`zmserve broker|worker|agent`: thin click commands over the services. Every flag also reads ZMSERVE_<FLAG>."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from services.gateway.config import (
    DEFAULT_BIND,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_REQUEST_TIMEOUT_S,
)
from zmserve.logs import configure_logging, get_logger
from zmserve.protocol import (
    DEFAULT_AGENT_START_PORT,
    DEFAULT_BROKER_CLIENT_ADDRESS,
    DEFAULT_BROKER_WORKER_ADDRESS,
    DEFAULT_DISTRIBUTED_ADDRESS,
    EXECUTION_TIMEOUT_S,
    HEARTBEAT_INTERVAL_S,
    MAX_BATCH_DELAY_S,
    MAX_BATCH_SIZE,
    MAX_INFLIGHT_MODEL_CALLS,
    MAX_QUEUED_REQUESTS,
    MAX_REQUEST_BYTES,
)
from zmserve.security import PLAINTEXT, Domain, Peer, is_loopback
from zmserve.security_cli import curve_options, keys, load_security
from zmserve.supervision import handle_stop_signals

log = get_logger("cli")


def run_until_signalled(service: Any) -> None:
    """Run a service in the foreground; SIGINT/SIGTERM stop it cleanly, a second one forces the exit."""
    handle_stop_signals(service.stop)
    result = service.run()
    sys.exit(result if isinstance(result, int) else 0)


@click.group(context_settings={"auto_envvar_prefix": "ZMSERVE", "help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(log_level: str) -> None:
    """zmserve: distributed MindSpore inference over ZeroMQ."""
    os.environ["ZMSERVE_LOG_LEVEL"] = log_level  # agents and other children log at the same level
    configure_logging(log_level)


@main.command()
@click.option("--bind", default=DEFAULT_BROKER_CLIENT_ADDRESS, show_default=True, help="client-facing ROUTER")
@click.option("--worker-bind", default=DEFAULT_BROKER_WORKER_ADDRESS, show_default=True,
              help="ROUTER that workers register on")
@click.option("--heartbeat-interval", default=HEARTBEAT_INTERVAL_S, show_default=True, type=float)
@click.option("--max-request-mb", default=MAX_REQUEST_BYTES // 2**20, show_default=True,
              type=click.IntRange(min=1), help="larger requests are refused with RESOURCE_EXHAUSTED")
@curve_options(allowed=[Domain.CLIENTS, Domain.WORKERS])
def broker(bind: str, worker_bind: str, heartbeat_interval: float, max_request_mb: int, **curve: Any) -> None:
    """Route client requests to the workers serving them."""
    from services.broker.broker import Broker
    from zmserve.transport import BindError

    security = load_security(curve, [Domain.CLIENTS, Domain.WORKERS],
                             binds={Domain.CLIENTS: bind, Domain.WORKERS: worker_bind})
    try:
        service = Broker(bind, worker_bind, heartbeat_interval=heartbeat_interval,
                         max_request_bytes=max_request_mb * 2**20, security=security)
    except BindError as error:
        raise click.ClickException(str(error)) from None
    run_until_signalled(service)


def worker_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options of one servable's worker, shared by `zmserve worker` and `zmserve serve`."""
    options = [
        click.option("--servable-dir", required=True, type=click.Path(exists=True, file_okay=False)),
        click.option("--servable", required=True, help="folder inside --servable-dir holding servable_config.py"),
        click.option("--version", "version_number", default=1, show_default=True, type=click.IntRange(min=1)),
        click.option("--rank-table", type=click.Path(exists=True, dir_okay=False)),
        click.option("--distributed-address", default=DEFAULT_DISTRIBUTED_ADDRESS, show_default=True,
                     help="where agents register (host:port)"),
        click.option("--wait-agents", default=0.0, show_default=True, type=click.FloatRange(min=0),
                     help="seconds to wait for all agents; 0 = forever"),
        click.option("--heartbeat-interval", default=HEARTBEAT_INTERVAL_S, show_default=True, type=float),
        click.option("--max-inflight", default=MAX_INFLIGHT_MODEL_CALLS, show_default=True,
                     type=click.IntRange(min=1), help="model calls in the pipeline at once"),
        click.option("--max-queued", default=MAX_QUEUED_REQUESTS, show_default=True, type=click.IntRange(min=1),
                     help="requests held before RESOURCE_EXHAUSTED"),
        click.option("--execution-timeout", default=EXECUTION_TIMEOUT_S, show_default=True,
                     type=click.FloatRange(min=0.1),
                     help="seconds without a model result (calls in flight) before the agents are restarted"),
        click.option("--max-batch-size", default=MAX_BATCH_SIZE, show_default=True, type=click.IntRange(min=1),
                     help="instances per model call (servables with_batch_dim=True)"),
        click.option("--max-batch-delay-ms", default=MAX_BATCH_DELAY_S * 1000, show_default=True,
                     type=click.FloatRange(min=0), help="how long a batch's first instance waits for more"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def make_worker(broker_address: str | None, servable_dir: str, servable: str, version_number: int,
                rank_table: str | None, distributed_address: str, wait_agents: float, heartbeat_interval: float,
                max_inflight: int, max_queued: int, execution_timeout: float, max_batch_size: int,
                max_batch_delay_ms: float, security: Any = None) -> Any:
    """A Worker from the worker options; a broken servable, rank table or address is one line, no traceback."""
    from services.worker.config import WorkerConfig
    from services.worker.worker import Worker
    from zmserve.ranktable import RankTableError
    from zmserve.servable import ServableConfigError
    from zmserve.transport import BindError

    try:
        return Worker(WorkerConfig(
            servable_dir, servable, version_number, rank_table, distributed_address, broker_address, wait_agents,
            heartbeat_interval=heartbeat_interval, max_inflight_calls=max_inflight, max_queued_requests=max_queued,
            execution_timeout=execution_timeout, max_batch_size=max_batch_size,
            max_batch_delay=max_batch_delay_ms / 1000, security=security or PLAINTEXT))
    except (ServableConfigError, RankTableError, BindError) as error:
        raise click.ClickException(str(error)) from None


def run_service(service: Any) -> None:
    """Run until signalled; a service that cannot go on (e.g. its agents never came) is one line, exit 1."""
    try:
        run_until_signalled(service)
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None


@main.command()
@worker_options
@click.option("--broker", "broker_address", default=DEFAULT_BROKER_WORKER_ADDRESS, show_default=True,
              help="the broker's worker-facing address")
@curve_options(allowed=[Domain.AGENTS], peers=[Peer.BROKER], collective=True)
def worker(broker_address: str, **options: Any) -> None:
    """Serve one servable: wait for its agents, then take requests from the broker."""
    security = load_security(options, [Domain.AGENTS], [Peer.BROKER],
                             binds={Domain.AGENTS: options["distributed_address"]},
                             group_host=options["distributed_address"])
    run_service(make_worker(broker_address, **options, security=security))


@main.command()
@click.option("--bind", default=DEFAULT_BROKER_CLIENT_ADDRESS, show_default=True,
              help="where clients connect (the broker's client address)")
@click.option("--worker-bind", default=None,
              help="also take workers of other processes or machines here (default: none, only this one)")
@click.option("--max-request-mb", default=MAX_REQUEST_BYTES // 2**20, show_default=True,
              type=click.IntRange(min=1), help="larger requests are refused with RESOURCE_EXHAUSTED")
@worker_options
@curve_options(allowed=[Domain.CLIENTS, Domain.WORKERS, Domain.AGENTS], collective=True)
def serve(bind: str, worker_bind: str | None, max_request_mb: int, **options: Any) -> None:
    """Broker and worker in one process: one machine, one servable, the shortest path for a request.

    Clients connect exactly as to `zmserve broker`; agents register as with `zmserve worker` (with CURVE, they
    hold this process's public key as the worker's).
    """
    from services.broker.broker import Broker
    from services.colocated import Colocated
    from zmserve.transport import BindError

    security = load_security(options, [Domain.CLIENTS, Domain.WORKERS, Domain.AGENTS], binds={
        Domain.CLIENTS: bind, Domain.WORKERS: worker_bind, Domain.AGENTS: options["distributed_address"]},
        group_host=options["distributed_address"])
    worker_service = make_worker(None, **options, security=security)
    try:
        broker_service = Broker(bind, worker_bind, heartbeat_interval=options["heartbeat_interval"],
                                max_request_bytes=max_request_mb * 2**20, security=security)
    except BindError as error:
        worker_service.close_sockets()
        raise click.ClickException(str(error)) from None
    run_service(Colocated(broker_service, worker_service))


def _split(values: tuple[str, ...]) -> list[str]:
    return [part for value in values for part in value.split(",") if part]


@main.command()
@click.option("--worker", "worker_address", default=DEFAULT_DISTRIBUTED_ADDRESS, show_default=True,
              help="the worker's distributed address")
@click.option("--model-files", multiple=True, required=True,
              help="one MindIR per agent, in rank order (repeat the flag or separate with commas)")
@click.option("--group-config-files", multiple=True, help="one group config per model file")
@click.option("--agent-start-port", default=DEFAULT_AGENT_START_PORT, show_default=True,
              type=click.IntRange(1, 65535), help="agent i publishes to the next stage on this port + i")
@click.option("--agent-ip", default=None, help="this machine's address as the other agents see it")
@click.option("--rank-start", default=None, type=click.IntRange(min=0), help="rank of the first model file")
@click.option("--heartbeat-interval", default=None, type=float)
@click.option("--pin-cpus/--no-pin-cpus", default=False, show_default=True,
              help="pin agent i to core i mod cores (MindSpore otherwise spreads each agent over all cores)")
@curve_options(peers=[Peer.WORKER], collective=True)
def agent(worker_address: str, model_files: tuple[str, ...], group_config_files: tuple[str, ...],
          agent_start_port: int, agent_ip: str | None, rank_start: int | None,
          heartbeat_interval: float | None, pin_cpus: bool, **curve: Any) -> None:
    """Start and supervise one agent process per model file on this machine.

    Ranks: --rank-start + position; without --rank-start, this machine's ranks in the worker's rank table
    (server --agent-ip), or 0.. when the worker has none.
    """
    from services.agent.launcher import AgentLauncher, LauncherError

    # this machine's MindSpore traffic goes to the worker's host (the schedulers) and to the other agents
    group_host = next((a for a in (agent_ip, worker_address) if a and not is_loopback(a)), "127.0.0.1")
    security = load_security(curve, peers=[Peer.WORKER], group_host=group_host)
    if security.client(Peer.WORKER) is None:  # a stage leader publishes to the next stage on --agent-ip
        security.warn_plaintext({Domain.DOWNSTREAM: agent_ip})
    try:
        launcher = AgentLauncher(worker_address, _split(model_files), _split(group_config_files) or None,
                                 agent_start_port, agent_ip, rank_start, heartbeat_interval, pin_cpus,
                                 security=security)
        run_until_signalled(launcher)
    except LauncherError as error:
        raise click.ClickException(str(error)) from None


@main.command()
@click.option("--bind", default=DEFAULT_BIND, show_default=True, help="HTTP host:port (port 0 = any free port)")
@click.option("--broker", "broker_address", default=DEFAULT_BROKER_CLIENT_ADDRESS, show_default=True,
              help="the broker's client-facing address")
@click.option("--timeout", default=DEFAULT_REQUEST_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0.001),
              help="each request's deadline in seconds, unless it sets its own (OIP parameter 'timeout')")
@click.option("--max-body-mb", default=DEFAULT_MAX_BODY_MB, show_default=True, type=click.IntRange(min=1),
              help="larger request bodies are answered 413")
@click.option("--body-timeout", default=DEFAULT_BODY_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0.01),
              help="a body not complete this many seconds after its headers is answered 408")
@click.option("--keep-alive-timeout", default=DEFAULT_KEEP_ALIVE_S, show_default=True,
              type=click.FloatRange(min=0.1), help="idle keep-alive connections are closed after this long")
@click.option("--certfile", type=click.Path(exists=True, dir_okay=False),
              help="serve HTTPS with this certificate (PEM, with its chain); needs --keyfile")
@click.option("--keyfile", type=click.Path(exists=True, dir_okay=False), help="the private key of --certfile (PEM)")
@click.option("--auth-token-file", type=click.Path(exists=True, dir_okay=False),
              help="every request must carry 'Authorization: Bearer <the token in this file>' (else 401)")
@curve_options(peers=[Peer.BROKER])
def gateway(bind: str, broker_address: str, timeout: float, max_body_mb: int, body_timeout: float,
            keep_alive_timeout: float, certfile: str | None, keyfile: str | None, auth_token_file: str | None,
            **curve: Any) -> None:
    """Answer HTTP: MindSpore Serving's RESTful scheme (/model/...) and the Open Inference Protocol (/v2/...)."""
    import ssl

    from services.gateway.app import Gateway
    from services.gateway.auth import http_security
    from services.gateway.config import GatewayConfig

    security = load_security(curve, peers=[Peer.BROKER])
    try:
        tls, token = http_security(bind, certfile, keyfile, auth_token_file)
    except (OSError, ValueError, ssl.SSLError) as error:
        raise click.ClickException(str(error)) from None
    config = GatewayConfig(bind, broker_address, timeout, max_body_mb * 2**20, body_timeout, keep_alive_timeout,
                           tls=tls, auth_token=token, broker_curve=security.client(Peer.BROKER))
    try:
        service = Gateway(config)
    except (OSError, ValueError) as error:
        raise click.ClickException(f"cannot listen on {bind}: {error}") from None
    run_until_signalled(service)


from zmserve.bench.cli import bench  # noqa: E402

main.add_command(bench)
main.add_command(keys)

if __name__ == "__main__":
    main()
