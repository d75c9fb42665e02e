"""`zmserve broker|worker|serve|agent|bench`: thin click commands over the services.

Every option also reads ZMSERVE_<COMMAND>_<OPTION> from the environment (`name_environment_variables`)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click
from click.core import ParameterSource

from zmserve.endpoints import (
    DEFAULT_AGENT_START_PORT,
    DEFAULT_BROKER_CLIENT_ADDRESS,
    DEFAULT_BROKER_WORKER_ADDRESS,
    DEFAULT_DISTRIBUTED_ADDRESS,
    endpoint_host_port,
    normalize_address,
)
from zmserve.lifecycle import Service, run_in_foreground
from zmserve.logs import configure_logging, get_logger
from zmserve.protocol import MAX_REQUEST_BYTES
from zmserve.security import PLAINTEXT, Domain, Peer, is_local_address
from zmserve.security_cli import curve_options, keys, load_security, warn_on_network
from zmserve.supervision import act_on_sigint
from zmserve.transport import HEARTBEAT_INTERVAL_S
from zmserve_services.gateway.config import (
    DEFAULT_BIND,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_REQUEST_TIMEOUT_S,
)
from zmserve_services.worker.defaults import (
    DRAIN_TIMEOUT_S,
    EXECUTION_TIMEOUT_S,
    MAX_BATCH_DELAY_S,
    MAX_BATCH_SIZE,
    MAX_INFLIGHT_MODEL_CALLS,
    MAX_QUEUED_REQUESTS,
    MAX_SEQUENCES,
)

log = get_logger("cli")

DEFAULT_BROKER_METRICS_BIND = "127.0.0.1:9500"
DEFAULT_WORKER_METRICS_BIND = "127.0.0.1:9501"
DEFAULT_GATEWAY_METRICS_BIND = "127.0.0.1:9502"
"""Where `zmserve broker` (and `zmserve serve`), `zmserve worker` and `zmserve gateway` serve Prometheus metrics
unless told otherwise (zmserve.metrics is imported only by the commands that serve them)."""


def run_until_signalled(service: Service) -> None:
    """Run a service in the foreground (zmserve/lifecycle.py: SIGINT stops it, SIGTERM drains it, a second
    signal forces the exit) and exit with its code."""
    sys.exit(run_in_foreground(service))


def metrics_option(default: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return click.option("--metrics-bind", default=default, show_default=True,
                        help="Serve Prometheus metrics at http://HOST:PORT/metrics (port 0 = any free port); "
                             "'off' records none.")


def records_metrics(bind: str) -> bool:
    """Whether the service records metrics: unless `--metrics-bind off` (an invalid value is a usage error)."""
    from zmserve import metrics

    try:
        return metrics.parse_bind(bind) is not None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--metrics-bind") from None


@contextlib.contextmanager
def metrics_endpoint(bind: str, roles: list[str]) -> Iterator[bool]:
    """Serve the metrics of `roles` ("broker", "worker", "gateway") while the command runs. Opened after the
    service has bound its own sockets, so a service that cannot start says only why. A default port that is taken
    (a second worker on this machine) is a warning and no endpoint (the service still records: a few µs per
    request); a port the user chose that is taken is an error. Yields whether the endpoint serves."""
    from zmserve import metrics

    address = metrics.parse_bind(bind)
    if address is None:
        yield False
        return
    registries = {"broker": metrics.BROKER, "worker": metrics.WORKER, "gateway": metrics.GATEWAY}
    try:
        endpoint = metrics.MetricsEndpoint(*address, [registries[role] for role in roles])
    except OSError as error:
        if click.get_current_context().get_parameter_source("metrics_bind") is not ParameterSource.DEFAULT:
            raise click.ClickException(f"cannot serve metrics on {bind}: {error.strerror or error}") from None
        log.warning("metrics_off", bind=bind, why=error.strerror or str(error),
                    hint="the default metrics port is taken; pass --metrics-bind HOST:PORT (or off)")
        yield False
        return
    log.info("metrics_serving", url=endpoint.url)
    try:
        yield True
    finally:
        endpoint.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]),
              help="Least severe level logged, on stderr (JSON lines when stderr is not a terminal); the agents and "
                   "schedulers this command starts log at the same level.")
def main(log_level: str) -> None:
    """zmserve: distributed MindSpore inference over ZeroMQ.

    Every option can also be set in the environment as ZMSERVE_<COMMAND>_<OPTION> (e.g.
    ZMSERVE_WORKER_SERVABLE_DIR, ZMSERVE_BROKER_BIND), and --log-level as ZMSERVE_LOG_LEVEL; each option's
    --help line names its variable.
    """
    os.environ["ZMSERVE_LOG_LEVEL"] = log_level  # agents and other children log at the same level
    configure_logging(log_level)
    act_on_sigint()


HEARTBEAT_HELP = "Seconds between heartbeats; a peer not heard from for 3 intervals is taken as lost."
MAX_REQUEST_HELP = "Largest request taken, in MiB (all its frames); a larger one is answered RESOURCE_EXHAUSTED."


@main.command()
@click.option("--bind", default=DEFAULT_BROKER_CLIENT_ADDRESS, show_default=True,
              help="Address clients connect to (tcp://HOST:PORT or HOST:PORT). 127.0.0.1 takes only this machine's "
                   "clients; tcp://0.0.0.0:PORT takes any.")
@click.option("--worker-bind", default=None,
              help=f"Address workers register on (their --broker). Default: the --bind host with the --bind port + 1 "
                   f"({DEFAULT_BROKER_WORKER_ADDRESS} with the default --bind).")
@click.option("--heartbeat-interval", default=HEARTBEAT_INTERVAL_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help=HEARTBEAT_HELP + " A lost worker's requests are answered UNAVAILABLE.")
@click.option("--max-request-mb", default=MAX_REQUEST_BYTES // 2**20, show_default=True,
              type=click.IntRange(min=1), help=MAX_REQUEST_HELP)
@metrics_option(DEFAULT_BROKER_METRICS_BIND)
@curve_options(allowed=[Domain.CLIENTS, Domain.WORKERS])
def broker(bind: str, worker_bind: str | None, heartbeat_interval: float, max_request_mb: int,
           metrics_bind: str, **curve: Any) -> None:
    """Route client requests to the workers serving them.

    Ready when it logs `broker_started`; workers then register on --worker-bind.
    """
    from zmserve.transport import BindError
    from zmserve_services.broker.broker import Broker

    try:
        worker_bind = worker_bind or following_port(bind)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    binds = {Domain.CLIENTS: bind, Domain.WORKERS: worker_bind}
    security = load_security(curve, [Domain.CLIENTS, Domain.WORKERS], binds=binds)
    try:
        service = Broker(bind, worker_bind, heartbeat_interval=heartbeat_interval,
                         max_request_bytes=max_request_mb * 2**20, metrics=records_metrics(metrics_bind),
                         security=security)
    except (BindError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    warn_on_network(security, binds)
    with metrics_endpoint(metrics_bind, ["broker"]):
        run_until_signalled(service)


def following_port(address: str) -> str:
    """The broker's default worker address: its client address with the next port (0 stays 0: any free port)."""
    host, port = endpoint_host_port(address)
    return f"{normalize_address(address).split('://', 1)[0]}://{host}:{port + 1 if port else 0}"


def worker_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options of one servable's worker, shared by `zmserve worker` and `zmserve serve`."""
    options = [
        click.option("--servable-dir", required=True, type=click.Path(exists=True, file_okay=False),
                     help="The PARENT of the servable's folder: the worker loads "
                          "<servable-dir>/<servable>/servable_config.py (e.g. --servable-dir "
                          "examples/matmul_distributed --servable matmul)."),
        click.option("--servable", required=True,
                     help="The servable's name: its folder inside --servable-dir, and the name clients call."),
        click.option("--version", default=0, show_default=True, type=click.IntRange(min=0),
                     help="The version this worker serves: a numbered folder <servable-dir>/<servable>/N/ holding "
                          "that version's model files, as MindSpore Serving lays them out. 0 = the newest such "
                          "folder, or 1 when the servable has none. (Clients ask for a version, or 0 for the newest "
                          "version that some worker is ready to serve.)"),
        click.option("--rank-table", type=click.Path(exists=True, dir_okay=False),
                     help="JSON rank table (MindSpore's schema: server_list -> device -> rank_id) saying which "
                          "machine (server_id) holds which ranks; a launcher without --rank-start takes its "
                          "machine's ranks from it. Default: none (launchers number their agents from 0, or from "
                          "--rank-start)."),
        click.option("--distributed-address", default=DEFAULT_DISTRIBUTED_ADDRESS, show_default=True,
                     help="HOST:PORT where agents and launchers reach this worker. Its data sockets and the "
                          "stages' MindSpore schedulers listen on the same host: every agent machine must reach it."),
        click.option("--wait-agents", default=0.0, show_default=True, type=click.FloatRange(min=0),
                     help="Seconds to wait for every rank's agent to register before exiting with an error; "
                          "0 waits forever."),
        click.option("--heartbeat-interval", default=HEARTBEAT_INTERVAL_S, show_default=True,
                     type=click.FloatRange(min=0, min_open=True),
                     help=HEARTBEAT_HELP + " Applies to the broker link and the agents."),
        click.option("--max-inflight", default=MAX_INFLIGHT_MODEL_CALLS, show_default=True,
                     type=click.IntRange(min=1),
                     help="Model calls in the pipeline at once (with several stages, stage 0 takes call n+1 while "
                          "stage 1 runs call n); more wait in the worker."),
        click.option("--max-queued", default=MAX_QUEUED_REQUESTS, show_default=True, type=click.IntRange(min=1),
                     help="Requests held at once (running or waiting); one more is answered RESOURCE_EXHAUSTED."),
        click.option("--execution-timeout", default=EXECUTION_TIMEOUT_S, show_default=True,
                     type=click.FloatRange(min=0.1),
                     help="Seconds the model may hold calls without returning any result before its agents are "
                          "restarted (held requests are answered UNAVAILABLE)."),
        click.option("--max-batch-size", default=MAX_BATCH_SIZE, show_default=True, type=click.IntRange(min=1),
                     help="Instances per model call, for servables declared with_batch_dim=True (a model exported "
                          "with a fixed batch size uses that size); ignored otherwise."),
        click.option("--max-batch-delay-ms", default=MAX_BATCH_DELAY_S * 1000, show_default=True,
                     type=click.FloatRange(min=0),
                     help="Milliseconds a batch's first instance waits for more before the batch leaves anyway "
                          "(with_batch_dim=True only)."),
        click.option("--max-sequences", default=MAX_SEQUENCES, show_default=True, type=click.IntRange(min=1),
                     help="Sequences generated at once (requests of a method whose stage calls a stateful model: "
                          "each holds a slot until it ends); one more is answered RESOURCE_EXHAUSTED at once."),
        click.option("--drain-timeout", default=DRAIN_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0),
                     help="On SIGTERM, seconds to finish the requests held (the broker routes this worker nothing "
                          "more at once) before stopping anyway; then exit 0. 0 stops at once, as SIGINT does. "
                          "Requests still held are answered UNAVAILABLE, or sent to another replica as their retry "
                          "policy allows (PROTOCOL.md §4.10)."),
        click.option("--ready-file", default=None, type=click.Path(dir_okay=False),
                     help="A file to create while this worker serves and remove when it does not (agents "
                          "restarting, draining, stopped): for readiness probes, e.g. Kubernetes' `test -f FILE`. "
                          "Under systemd (Type=notify) the worker also sends READY=1 when it first serves and "
                          "STOPPING=1 when it drains. Default: none."),
        click.option("--standby/--no-standby", default=True, show_default=True,
                     help="Once serving, keep one idle scheduler process per stage with MindSpore imported, so a "
                          "restart of the agents skips the import."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def make_worker(broker_address: str | None, servable_dir: str, servable: str, version: int,
                rank_table: str | None, distributed_address: str, wait_agents: float, heartbeat_interval: float,
                max_inflight: int, max_queued: int, execution_timeout: float, max_batch_size: int,
                max_batch_delay_ms: float, drain_timeout: float, ready_file: str | None, standby: bool = True,
                metrics: bool = False, security: Any = None, max_sequences: int = MAX_SEQUENCES) -> Any:
    """A Worker from the worker options; a broken servable, rank table or address is one line, no traceback."""
    from zmserve.ranktable import RankTableError
    from zmserve.servable import ServableConfigError
    from zmserve.transport import BindError
    from zmserve_services.worker.config import WorkerConfig
    from zmserve_services.worker.worker import Worker

    try:
        return Worker(WorkerConfig(
            servable_dir, servable, version, rank_table, distributed_address, broker_address, wait_agents,
            heartbeat_interval=heartbeat_interval, max_inflight_calls=max_inflight, max_queued_requests=max_queued,
            execution_timeout=execution_timeout, max_batch_size=max_batch_size,
            max_batch_delay=max_batch_delay_ms / 1000, drain_timeout=drain_timeout, ready_file=ready_file,
            standby_schedulers=standby, metrics=metrics, security=security or PLAINTEXT, max_sequences=max_sequences))
    except (ServableConfigError, RankTableError, BindError, ValueError) as error:
        raise click.ClickException(str(error)) from None


def run_service(service: Any) -> None:
    """Run until signalled; a service that cannot go on (e.g. its agents never came) is one line, exit 1."""
    try:
        run_until_signalled(service)
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None


@main.command()
@worker_options
@click.option("--broker", default=DEFAULT_BROKER_WORKER_ADDRESS, show_default=True,
              help="The broker's worker address (its --worker-bind) to register with; the worker keeps trying "
                   "until a broker listens there.")
@metrics_option(DEFAULT_WORKER_METRICS_BIND)
@curve_options(allowed=[Domain.AGENTS], peers=[Peer.BROKER], collective=True)
def worker(broker: str, metrics_bind: str, **options: Any) -> None:
    """Serve one servable: wait for its agents, then take requests from the broker.

    Ready when it logs `serving` (every agent registered, joined its group and loaded its shard); --ready-file and
    systemd's READY=1 say the same to a supervisor. SIGTERM drains (finishes what it holds, then exits 0);
    SIGINT stops at once.
    """
    binds, group_host = {Domain.AGENTS: options["distributed_address"]}, options["distributed_address"]
    security = load_security(options, [Domain.AGENTS], [Peer.BROKER], binds=binds, group_host=group_host)
    service = make_worker(broker, **options, metrics=records_metrics(metrics_bind), security=security)
    warn_on_network(security, binds, group_host)
    with metrics_endpoint(metrics_bind, ["worker"]):
        run_service(service)


@main.command()
@click.option("--bind", default=DEFAULT_BROKER_CLIENT_ADDRESS, show_default=True,
              help="Address clients connect to, as `zmserve broker --bind`.")
@click.option("--worker-bind", default=None,
              help="Also take workers of other processes or machines here, as `zmserve broker --worker-bind`. "
                   "Default: none (only this process's worker).")
@click.option("--max-request-mb", default=MAX_REQUEST_BYTES // 2**20, show_default=True,
              type=click.IntRange(min=1), help=MAX_REQUEST_HELP)
@worker_options
@metrics_option(DEFAULT_BROKER_METRICS_BIND)
@curve_options(allowed=[Domain.CLIENTS, Domain.WORKERS, Domain.AGENTS], collective=True)
def serve(bind: str, worker_bind: str | None, max_request_mb: int, metrics_bind: str, **options: Any) -> None:
    """Broker and worker in one process: one machine, one servable, the shortest path for a request.

    Clients connect exactly as to `zmserve broker`; agents register as with `zmserve worker` (with CURVE, they
    hold this process's public key as the worker's). Ready when it logs `serving`. One metrics endpoint shows
    both the broker's and the worker's metrics.
    """
    from zmserve.transport import BindError
    from zmserve_services.broker.broker import Broker
    from zmserve_services.colocated import Colocated

    binds = {Domain.CLIENTS: bind, Domain.WORKERS: worker_bind, Domain.AGENTS: options["distributed_address"]}
    security = load_security(options, [Domain.CLIENTS, Domain.WORKERS, Domain.AGENTS], binds=binds,
                             group_host=options["distributed_address"])
    recording = records_metrics(metrics_bind)
    worker_service = make_worker(None, **options, metrics=recording, security=security)
    try:
        broker_service = Broker(bind, worker_bind, heartbeat_interval=options["heartbeat_interval"],
                                max_request_bytes=max_request_mb * 2**20, metrics=recording, security=security)
    except (BindError, ValueError) as error:
        worker_service.close_sockets()
        raise click.ClickException(str(error)) from None
    warn_on_network(security, binds, options["distributed_address"])
    with metrics_endpoint(metrics_bind, ["broker", "worker"]):
        run_service(Colocated(broker_service, worker_service))


def _split(values: tuple[str, ...]) -> list[str]:
    return [part for value in values for part in value.split(",") if part]


def _memory_size(_context: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    from zmserve_services.agent.memory_limit import parse_size

    try:
        return None if value is None else parse_size(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@main.command()
@click.option("--worker", default=DEFAULT_DISTRIBUTED_ADDRESS, show_default=True,
              help="The worker's --distributed-address (HOST:PORT); the launcher keeps trying until it listens.")
@click.option("--model-files", multiple=True, required=True,
              help="One MindIR per agent, in rank order (repeat the option or separate with commas): this launcher "
                   "starts one agent process per file.")
@click.option("--group-config-files", multiple=True,
              help="One group_config.json per model file, in the same order. Default: the group_config.json next "
                   "to each model file.")
@click.option("--agent-start-port", default=DEFAULT_AGENT_START_PORT, show_default=True,
              type=click.IntRange(1, 65535),
              help="Agent i (the i-th model file) publishes its stage's output on this port + i; two launchers on "
                   "one machine need port ranges that do not overlap.")
@click.option("--agent-ip", default=None,
              help="This machine's address as the worker and the other agents see it: the agents publish on it, "
                   "and without --rank-start it names this machine in the worker's rank table. Default: 127.0.0.1.")
@click.option("--rank-start", default=None, type=click.IntRange(min=0),
              help="Rank of the first model file (the others follow in order). Default: this machine's ranks from "
                   "the worker's --rank-table, or 0, 1, ... when the worker has none.")
@click.option("--heartbeat-interval", default=HEARTBEAT_INTERVAL_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help=HEARTBEAT_HELP + " Applies to the agents' link to the worker.")
@click.option("--pin-cpus/--no-pin-cpus", default=False, show_default=True,
              help="Pin agent i to core i mod cores (MindSpore otherwise spreads each agent over all cores).")
@click.option("--memory-limit", default=None, callback=_memory_size, metavar="SIZE",
              help="Memory per agent process, enforced by a cgroup (e.g. 1.5G; K/M/G/T are powers of 1024; "
                   "default: no limit).")
@click.option("--standby/--no-standby", default=True, show_default=True,
              help="Keep one idle process per agent with MindSpore imported, so a restart skips the import "
                   "(about 160 MiB of memory each).")
@curve_options(peers=[Peer.WORKER], collective=True)
def agent(worker: str, model_files: tuple[str, ...], group_config_files: tuple[str, ...],
          agent_start_port: int, agent_ip: str | None, rank_start: int | None,
          heartbeat_interval: float, pin_cpus: bool, memory_limit: int | None, standby: bool, **curve: Any) -> None:
    """Start and supervise one agent process per model file on this machine.

    An agent that exits is started again; when the worker refuses a shard for good (it does not fit the
    servable), the launcher stops its agents and exits with the worker's reason.
    """
    from zmserve_services.agent.launcher import AgentLauncher, LauncherError

    # this machine's MindSpore traffic goes to the worker's host (the schedulers) and to the other agents
    group_host = next((a for a in (agent_ip, worker) if a and not is_local_address(a)), "127.0.0.1")
    security = load_security(curve, peers=[Peer.WORKER], group_host=group_host)
    warn_on_network(security, group_host=group_host)
    if security.client(Peer.WORKER) is None:  # a stage leader publishes to the next stage on --agent-ip
        security.warn_plaintext({Domain.DOWNSTREAM: agent_ip})
    try:
        launcher = AgentLauncher(worker, _split(model_files), _split(group_config_files) or None,
                                 agent_start_port, agent_ip, rank_start, heartbeat_interval, pin_cpus, memory_limit,
                                 standby, security=security)
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
              help="Serve HTTPS with this certificate (PEM, with its chain); needs --keyfile.")
@click.option("--keyfile", type=click.Path(exists=True, dir_okay=False), help="The private key of --certfile (PEM).")
@click.option("--auth-token-file", type=click.Path(exists=True, dir_okay=False),
              help="Every request must carry 'Authorization: Bearer <the token in this file>' (else 401).")
@click.option("--grpc-bind", help="also answer gRPC on this host:port: MindSpore Serving's MSService/Predict and "
                                  "the OIP's GRPCInferenceService (port 0 = any free port)")
@metrics_option(DEFAULT_GATEWAY_METRICS_BIND)
@curve_options(peers=[Peer.BROKER])
def gateway(bind: str, broker_address: str, timeout: float, max_body_mb: int, body_timeout: float,
            keep_alive_timeout: float, certfile: str | None, keyfile: str | None, auth_token_file: str | None,
            grpc_bind: str | None, metrics_bind: str, **curve: Any) -> None:
    """Answer HTTP: MindSpore Serving's RESTful scheme (/model/...), the Open Inference Protocol (/v2/...) and a
    live status page (/); with --grpc-bind, gRPC too (MindSpore Serving's client, tritonclient.grpc)."""
    import ssl

    from zmserve_services.gateway.app import Gateway
    from zmserve_services.gateway.auth import http_security
    from zmserve_services.gateway.config import GatewayConfig

    security = load_security(curve, peers=[Peer.BROKER])
    try:
        tls, token = http_security(bind, certfile, keyfile, auth_token_file)
    except (OSError, ValueError, ssl.SSLError) as error:
        raise click.ClickException(str(error)) from None
    config = GatewayConfig(bind, broker_address, timeout, max_body_mb * 2**20, body_timeout, keep_alive_timeout,
                           metrics=records_metrics(metrics_bind), tls=tls, auth_token=token,
                           broker_curve=security.client(Peer.BROKER), grpc_bind=grpc_bind)
    try:
        service = Gateway(config)
    except (OSError, ValueError) as error:
        raise click.ClickException(f"cannot listen on {bind}: {error}") from None
    with metrics_endpoint(metrics_bind, ["gateway"]):
        run_until_signalled(service)


@main.command()
@click.option("--broker", "broker_address", default=DEFAULT_BROKER_CLIENT_ADDRESS, show_default=True,
              help="the broker's client-facing address")
@click.option("--json", "as_json", is_flag=True, help="print the broker's answer as JSON (one line per refresh)")
@click.option("--watch", is_flag=True, help="refresh every --interval seconds until interrupted")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1),
              help="seconds between refreshes with --watch")
@click.option("--timeout", default=3.0, show_default=True, type=click.FloatRange(min=0.01),
              help="seconds to wait for the broker's answer")
@curve_options(peers=[Peer.BROKER])
def status(broker_address: str, as_json: bool, watch: bool, interval: float, timeout: float, **curve: Any) -> None:
    """Show what is deployed: servables, workers, their agents by stage and rank, load and latency."""
    from zmserve.status import StatusUnavailable, watch_status

    security = load_security(curve, peers=[Peer.BROKER])
    try:
        watch_status(broker_address, as_json, watch, interval, timeout, curve=security.client(Peer.BROKER))
    except StatusUnavailable as error:
        raise click.ClickException(str(error)) from None


def name_environment_variables(command: click.Command, prefix: str = "ZMSERVE") -> None:
    """Give every option of every command the variable ZMSERVE_<COMMAND>_<OPTION> (its longest flag, dashes as
    underscores), and show it in --help. Click's automatic names follow the Python parameter instead, which is not
    always the flag's name."""
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden and param.name != "help":
            flag = max((o for o in param.opts if o.startswith("--")), key=len)
            param.envvar = f"{prefix}_{flag[2:].replace('-', '_').upper()}"
            param.show_envvar = True
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            name_environment_variables(sub, f"{prefix}_{name.replace('-', '_').upper()}")


from zmserve.bench.cli import bench  # noqa: E402

main.add_command(bench)
main.add_command(keys)
name_environment_variables(main)

if __name__ == "__main__":
    main()
