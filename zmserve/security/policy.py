"""Which socket gets which keys: the ZAP domains a process binds, the servers it connects to, and one
process's settings from its options (`Security`), applied to each socket before it binds or connects."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from zmserve.collective_tls import CollectiveTls
from zmserve.logs import get_logger
from zmserve.security.domains import ALLOWED_FLAG, CURVE_ON, PEER_FLAG, Domain, Peer
from zmserve.security.handshake import Refused, Watched, handshake_log
from zmserve.security.keys import KeyPair, SecurityError, allowed_keys, load_public_key
from zmserve.security.zap import authenticator

log = get_logger("security")


@dataclass(frozen=True)
class CurveServer:
    """What a binding socket needs: its key pair and whom it admits (a folder of .key files, or a set of keys)."""

    keys: KeyPair
    domain: Domain
    allowed: Path | frozenset[bytes]

    def apply(self, socket: zmq.Socket) -> None:
        """Before bind: the authenticator of the socket's context admits this domain's keys first, so that no
        handshake can happen without it (libzmq admits everyone when no ZAP handler listens)."""
        authenticator(socket.context).admit(self.domain, self.allowed)
        socket.curve_secretkey = self.keys.secret
        socket.curve_publickey = self.keys.public
        socket.curve_server = True
        socket.zap_domain = self.domain.value.encode()
        handshake_log().watch(socket, Watched(self.domain.value, server=True, curve=True))


@dataclass(frozen=True)
class CurveClient:
    """What a connecting socket needs: its key pair and the server's public key. `link` names it in the logs;
    `watch` logs refused handshakes (the Python client reads its own monitor instead); `on_refused` is told when
    the server refuses for good (libzmq does not reconnect after an authentication or mechanism failure)."""

    keys: KeyPair
    server_key: bytes
    link: str = "server"
    watch: bool = True
    on_refused: Refused | None = field(default=None, compare=False)

    def apply(self, socket: zmq.Socket) -> None:
        """Before connect."""
        socket.curve_secretkey = self.keys.secret
        socket.curve_publickey = self.keys.public
        socket.curve_serverkey = self.server_key
        if self.watch:
            handshake_log().watch(socket, Watched(self.link, server=False, curve=True, on_refused=self.on_refused))


Curve = CurveServer | CurveClient


def client_curve(server_public_key: str | os.PathLike | bytes | None,
                 secret_key: str | os.PathLike | KeyPair | None, link: str = "broker") -> CurveClient | None:
    """The CURVE settings of the Python client (and the gateway): both keys, or neither (plaintext)."""
    if server_public_key is None and secret_key is None:
        return None
    if server_public_key is None or secret_key is None:
        given = "secret_key" if server_public_key is None else "server_public_key"
        raise SecurityError("CURVE needs both server_public_key (the server's .key) and secret_key (this side's "
                            f".key_secret); got only {given}")
    keys = secret_key if isinstance(secret_key, KeyPair) else KeyPair.load(secret_key)
    return CurveClient(keys, load_public_key(server_public_key), link=link, watch=False)


@dataclass(frozen=True)
class Security:
    """One process's CURVE settings, from its options: its key pair, the folder of allowed public keys of each
    domain it binds, and the public key of each server it connects to. A link runs CURVE when its keys are
    given and plaintext otherwise; `require` turns a missing key into an error (`--require-curve`)."""

    keys: KeyPair | None = None
    secret_key_file: Path | None = None
    allowed: Mapping[Domain, Path] = field(default_factory=dict)
    server_key_files: Mapping[Peer, Path] = field(default_factory=dict)
    server_keys: Mapping[Peer, bytes] = field(default_factory=dict)
    collective_tls: CollectiveTls | None = None
    """MindSpore's TLS inside each stage's group (zmserve/collective_tls.py): not CURVE, but part of the same
    story, so it travels with the rest (`--collective-tls`)."""

    @classmethod
    def load(cls, secret_key: str | os.PathLike | None = None,
             allowed: Mapping[Domain, str | os.PathLike | None] | None = None,
             servers: Mapping[Peer, str | os.PathLike | None] | None = None) -> Security:
        """Read and check every key now, so that a wrong path fails the command at start, in one line."""
        folders = {domain: Path(path) for domain, path in (allowed or {}).items() if path}
        key_files = {peer: Path(path) for peer, path in (servers or {}).items() if path}
        if secret_key is None:
            given = [ALLOWED_FLAG.get(d, d.value) for d in folders] + [PEER_FLAG[p] for p in key_files]
            if given:
                raise SecurityError(f"{', '.join(given)} need --secret-key (this process's .key_secret file)")
            return cls()
        for folder in folders.values():
            allowed_keys(folder)
        return cls(KeyPair.load(secret_key), Path(secret_key), folders, key_files,
                   {peer: load_public_key(path) for peer, path in key_files.items()})

    def server(self, domain: Domain) -> CurveServer | None:
        """The settings of a socket this process binds for `domain`; None = plaintext."""
        if self.keys is None or domain not in self.allowed:
            return None
        return CurveServer(self.keys, domain, self.allowed[domain])

    def client(self, peer: Peer, on_refused: Refused | None = None) -> CurveClient | None:
        """The settings of a socket this process connects to `peer`; None = plaintext."""
        if self.keys is None or peer not in self.server_keys:
            return None
        return CurveClient(self.keys, self.server_keys[peer], link=peer.value, on_refused=on_refused)

    def require(self, domains: Iterable[Domain] = (), peers: Iterable[Peer] = ()) -> None:
        """`--require-curve`: every link of this process must have its keys, or the process does not start."""
        missing = [] if self.keys is not None else ["--secret-key"]
        missing += [ALLOWED_FLAG[d] for d in domains if d not in self.allowed]
        missing += [PEER_FLAG[p] for p in peers if p not in self.server_keys]
        if missing:
            raise SecurityError(f"--require-curve: {', '.join(missing)} not given (docs/SECURITY.md shows the "
                                "key layout; `zmserve keys generate` makes key pairs)")

    def warn_plaintext(self, binds: Mapping[Domain, str | None]) -> None:
        """Log, at start, every address this process binds on a network interface without CURVE."""
        for domain, address in binds.items():
            if address and not is_local_address(address) and self.server(domain) is None:
                log.warning("plaintext_on_network", address=address, domain=domain.value,
                            how=f"anyone who reaches {address} can connect and read the traffic: turn CURVE on with "
                                f"{CURVE_ON[domain]} (docs/SECURITY.md), or bind 127.0.0.1")


PLAINTEXT = Security()


def is_local_address(address: str) -> bool:
    """Whether an address (host:port, tcp://host:port, ipc://...) is reachable from this machine only."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", a host name: reachable from elsewhere as far as we know
        return False
