"""What CURVE secures, by name: the ZAP domains a process binds (who may connect to it) and the servers it
connects to (whose public keys it holds), with the command-line option that gives each its keys."""

from __future__ import annotations

from enum import StrEnum


class Domain(StrEnum):
    """ZAP domains: who may connect to a binding socket."""

    CLIENTS = "clients"
    """the broker's client socket: clients and gateways"""
    WORKERS = "workers"
    """the broker's worker socket"""
    AGENTS = "agents"
    """the worker's distributed address, stage-0 publisher and results socket: agents and launchers"""
    DOWNSTREAM = "downstream"
    """a stage leader's publisher: the next stage's agents, as the worker names them (AGENT_CONFIGURE)"""


class Peer(StrEnum):
    """The servers a process connects to, whose public keys it must hold."""

    BROKER = "broker"
    WORKER = "worker"


ALLOWED_FLAG = {Domain.CLIENTS: "--client-keys", Domain.WORKERS: "--worker-keys", Domain.AGENTS: "--agent-keys"}
PEER_FLAG = {Peer.BROKER: "--broker-key", Peer.WORKER: "--worker-key"}
CURVE_ON = {**{domain: f"--secret-key and {flag}" for domain, flag in ALLOWED_FLAG.items()},
            Domain.DOWNSTREAM: "--secret-key and --worker-key (zmserve agent)"}
"""How to turn CURVE on for the sockets of a domain."""
