"""Which ranks this machine's agents hold: `--rank-start` + position, or this machine's entries in the worker's
rank table, which the launcher asks the worker for (startup order is free: it waits until the worker answers)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import zmq

from zmserve.logs import get_logger
from zmserve.protocol import RankTableAnswer, RankTableQuery, ServingError, decode, encode
from zmserve.ranktable import RankTable
from zmserve.security import Curve, Handshake, Peer, Security, send_unless_refused
from zmserve.transport import HeartbeatClock, new_socket
from zmserve_services.agent.processes import AgentProcess, LauncherError, publish_address

log = get_logger("launcher")


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the launcher was given: one model file (and group config file) per agent, where agents publish."""

    model_files: list[str]
    group_config_files: list[str] | None
    agent_start_port: int
    agent_ip: str | None
    rank_start: int | None


def assign_ranks(layout: Layout, worker_address: str, security: Security,
                 stopped: Callable[[], bool]) -> list[AgentProcess] | None:
    """This machine's agents with their ranks; None if stopped while waiting for the worker."""
    table, rank_size = None, None
    if layout.rank_start is None:
        answer = ask_worker_for_rank_table(worker_address, security, stopped)
        if answer is None:
            return None
        table, rank_size = answer
    if table is not None:
        document = RankTable.parse(table, rank_size, "the worker's rank table")
        servers = sorted({e.server_id for e in document.entries.values()})
        server = layout.agent_ip or (servers[0] if len(servers) == 1 else None)
        if server is None:
            raise LauncherError(f"the rank table lists servers {servers}: give --agent-ip to pick this one")
        ranks = document.ranks_of_server(server)
        if len(ranks) != len(layout.model_files):
            raise LauncherError(f"the rank table gives server {server} ranks {ranks}, but "
                                f"{len(layout.model_files)} model files were given")
    else:
        ranks = [(layout.rank_start or 0) + i for i in range(len(layout.model_files))]
    host = layout.agent_ip or "127.0.0.1"
    return [
        AgentProcess(
            rank=rank,
            model_file=Path(layout.model_files[i]),
            group_config_file=Path(layout.group_config_files[i]) if layout.group_config_files else None,
            publish_address=publish_address(host, layout.agent_start_port + i),
        )
        for i, rank in enumerate(ranks)
    ]


def ask_worker_for_rank_table(worker_address: str, security: Security,
                              stopped: Callable[[], bool]) -> tuple[dict | None, int] | None:
    """Wait (startup order is free) until the worker answers with its rank table, or `stopped()`."""
    context = zmq.Context.instance()
    curve = security.client(Peer.WORKER)
    sock = new_socket(context, zmq.DEALER, curve=unwatched(curve))
    handshake = Handshake(sock, curve is not None)
    sock.connect(worker_address)
    waiting = HeartbeatClock(5.0)
    asked = False
    try:
        while not stopped():
            refusal = handshake.read()
            if refusal is None and waiting.due():
                (log.info if asked else log.debug)("asking_worker_for_rank_table", worker=worker_address)
                refusal = send_unless_refused(sock, [encode(RankTableQuery())], handshake)
                asked = True
            if refusal is not None:
                raise LauncherError(f"the worker at {worker_address} refused this launcher: "
                                    f"{refusal.value} (docs/SECURITY.md)")
            if sock.poll(100):
                try:
                    answer = decode(sock.recv(), RankTableAnswer)
                except ServingError as error:
                    raise LauncherError(f"the worker at {worker_address} answered the rank-table "
                                        f"query with something else: {error.message}") from None
                return answer.table, answer.rank_size
        return None
    finally:
        handshake.close(sock)
        sock.close()


def unwatched(curve: Curve | None) -> Curve | None:
    """CURVE settings without a handshake monitor (a refusal shows in the rank-table query or the agents')."""
    return dataclasses.replace(curve, watch=False) if curve is not None else None
