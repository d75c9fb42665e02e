"""The command line of CURVE: `zmserve keys generate`, and the key options every service command shares.

Each command gets the options of its own links: `--secret-key` (its key pair), one folder of allowed public keys
per kind of peer it admits on the sockets it binds (`--client-keys`, `--worker-keys`, `--agent-keys`), one public
key per server it connects to (`--broker-key`, `--worker-key`), and `--require-curve`. Like every zmserve flag,
each is also read from ZMSERVE_<COMMAND>_<FLAG> (e.g. ZMSERVE_BROKER_SECRET_KEY).
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click

from zmserve.collective_tls import CollectiveTls, CollectiveTlsError
from zmserve.collective_tls import generate as generate_collective_tls
from zmserve.logs import get_logger
from zmserve.security import (
    ALLOWED_FLAG,
    PEER_FLAG,
    Domain,
    Peer,
    Security,
    SecurityError,
    generate_key_pair,
    is_local_address,
    reload_allowed_keys,
)

log = get_logger("security")

ALLOWED_HELP = {
    Domain.CLIENTS: "folder of the public keys (.key) of clients and gateways allowed to connect; turns CURVE on "
                    "for the client socket",
    Domain.WORKERS: "folder of the public keys of workers allowed to register; turns CURVE on for the worker socket",
    Domain.AGENTS: "folder of the public keys of agents and launchers allowed to connect; turns CURVE on for the "
                   "distributed address and the agents' data links",
}
PEER_HELP = {
    Peer.BROKER: "the broker's public key (.key file); turns CURVE on for the link to the broker",
    Peer.WORKER: "the worker's public key (.key file); turns CURVE on for the links to the worker and between "
                 "stages",
}


@click.group()
def keys() -> None:
    """CURVE key pairs for encrypted, authenticated links (docs/SECURITY.md)."""


@keys.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default=socket.gethostname(), show_default="this machine's host name",
              help="file name of the pair: NAME.key (public) and NAME.key_secret (secret)")
def generate(directory: str, name: str) -> None:
    """Write a new key pair into DIRECTORY (never overwriting one).

    Hand NAME.key to the peers that must admit this one (into their folder of allowed keys); keep
    NAME.key_secret on this machine and give it to this machine's zmserve commands with --secret-key."""
    try:
        public, secret = generate_key_pair(directory, name)
    except SecurityError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"public key: {public}\nsecret key: {secret}")


@keys.command("collective-tls")
@click.argument("directory", type=click.Path(file_okay=False))
def collective_tls(directory: str) -> None:
    """Write TLS material for MindSpore's traffic inside each stage (a CA, certificates, a password) into
    DIRECTORY; copy the folder to the worker's machine and every agent machine and give it to `zmserve worker`,
    `serve` and `agent` with --collective-tls. Needs the openssl command."""
    try:
        folder = generate_collective_tls(directory)
    except CollectiveTlsError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"collective TLS folder: {folder}")


def curve_options(allowed: Sequence[Domain] = (), peers: Sequence[Peer] = (),
                  collective: bool = False) -> Callable[..., Any]:
    """The key options of a command whose process binds sockets for `allowed` and connects to `peers`; with
    `collective`, also --collective-tls (its process starts or joins MindSpore groups)."""
    options = [click.option("--secret-key", type=click.Path(exists=True, dir_okay=False),
                            help="this process's CURVE key pair (a .key_secret file from `zmserve keys generate`)")]
    for domain in allowed:
        options.append(click.option(ALLOWED_FLAG[domain], domain.value,
                                    type=click.Path(exists=True, file_okay=False), help=ALLOWED_HELP[domain]))
    for peer in peers:
        options.append(click.option(PEER_FLAG[peer], f"{peer.value}_key", type=click.Path(exists=True, dir_okay=False),
                                    help=PEER_HELP[peer]))
    if collective:
        options.append(click.option("--collective-tls", type=click.Path(exists=True, file_okay=False),
                                    help="MindSpore's TLS inside each stage's group: a folder from `zmserve keys "
                                         "collective-tls` (the same on every machine of the cluster)"))
    options.append(click.option("--require-curve", is_flag=True, default=False,
                                help="refuse to start unless every link of this process has its keys (and, "
                                     "beyond loopback, the stage groups --collective-tls)"))

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def warn_on_network(security: Security, binds: Mapping[Domain, str | None] | None = None,
                    group_host: str | None = None) -> None:
    """A warning for every address this process binds on the network without CURVE, and for MindSpore's group
    traffic leaving the machine without TLS. Called once the service has bound its sockets, so that a command
    that cannot start prints only why."""
    security.warn_plaintext(binds or {})
    if group_host is not None and not is_local_address(group_host) and security.collective_tls is None:
        log.warning("plaintext_on_network", address=group_host, domain="collective",
                    how="MindSpore's traffic inside each stage (group formation and the collectives' tensors) "
                        "crosses the network in clear: give every machine --collective-tls (docs/SECURITY.md), "
                        "or keep a stage's agents on one private network")


def load_security(options: dict[str, Any], allowed: Sequence[Domain] = (), peers: Sequence[Peer] = (),
                  binds: Mapping[Domain, str | None] | None = None, group_host: str | None = None) -> Security:
    """Take the key options out of a command's keyword arguments: the process's `Security`, checked
    (`--require-curve`; `warn_on_network` warns of what it leaves in clear). `group_host` is where this
    process's MindSpore groups talk (commands with --collective-tls). SIGHUP makes the process read its folders
    of allowed keys again."""
    secret_key = options.pop("secret_key", None)
    folders = {domain: options.pop(domain.value, None) for domain in allowed}
    key_files = {peer: options.pop(f"{peer.value}_key", None) for peer in peers}
    tls_folder = options.pop("collective_tls", None)
    require = options.pop("require_curve", False)
    try:
        security = Security.load(secret_key, folders, key_files)
        if tls_folder is not None:
            security = dataclasses.replace(security, collective_tls=CollectiveTls.load(tls_folder))
        if require:  # a domain whose address is None is not bound by this process (`serve` without --worker-bind)
            security.require([d for d in allowed if binds is None or binds.get(d) is not None], peers)
            if group_host is not None and not is_local_address(group_host) and security.collective_tls is None:
                raise SecurityError("--require-curve: --collective-tls not given, and this process's MindSpore "
                                    f"group traffic leaves the machine ({group_host})")
    except (SecurityError, CollectiveTlsError) as error:
        raise click.ClickException(str(error)) from None
    if security.allowed and threading.current_thread() is threading.main_thread():
        # a signal handler only starts the work: the reload takes a lock the interrupted code may hold
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=reload_allowed_keys, daemon=True).start())
    return security
