"""CurveZMQ on zmserve's links: key files, the options of a socket that binds or connects, the process's
authenticator, and what a failed handshake means.

Every link is one socket that binds (a *server*: the broker's two ROUTERs; the worker's ROUTER, XPUB and PULL; a
stage leader's XPUB) and sockets that connect to it (*clients*). With CURVE (CurveZMQ, ZeroMQ RFC 26) both sides
hold a key pair and the client also holds the server's public key; every frame either way is then encrypted and
authenticated, and the server admits only the clients whose public keys it knows. Who is admitted is decided by
pyzmq's ZAP authenticator (`zmq.auth`), one per ZeroMQ context, per ZAP *domain* (`Domain`): a socket names its
domain, and each domain has its folder (or set) of allowed public keys. A server that admits nobody it does not
know cannot be disturbed by a stranger's frames: libzmq drops the connection before any frame is delivered.

Without keys a link runs in plaintext (ZeroMQ's NULL mechanism), the default on loopback. docs/SECURITY.md has
the threat model, the key layout and key rotation.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from zmserve.collective_tls import CollectiveTls
from zmserve.logs import get_logger

log = get_logger("security")

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
REPEAT_LOG_S = 10.0
"""The same refusal (same peer, same reason) is logged at most once per this many seconds, with a count."""


class SecurityError(ValueError):
    """A key file, a folder of keys or a combination of options that cannot work; one line for the user."""


# ---- keys ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, each key 40 Z85 characters (ZeroMQ's certificate format)."""

    public: bytes
    secret: bytes = field(repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> KeyPair:
        public, secret = _read_certificate(path)
        if secret is None:
            raise SecurityError(f"{path} holds no secret key: give the {SECRET_SUFFIX} file "
                                "(written by `zmserve keys generate`), not the public one")
        return cls(public, secret)


def load_public_key(source: str | os.PathLike | bytes) -> bytes:
    """A public key: bytes are the key itself (40 Z85 characters); a path names a certificate file (the .key, or
    the .key_secret, which holds the public key too)."""
    if isinstance(source, bytes):
        if len(source) != 40:
            raise SecurityError(f"a public key is 40 Z85 characters, got {len(source)} bytes")
        return source
    return _read_certificate(source)[0]


def _read_certificate(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise SecurityError(f"cannot read the key file {path}: {error}") from None
    if public is None or len(public) != 40:
        raise SecurityError(f"{path} holds no CURVE public key")
    return public, secret


def generate_key_pair(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """`zmserve keys generate`: DIR/NAME.key (public: hand it to the peers that must admit this one) and
    DIR/NAME.key_secret (secret: readable by its owner only). Existing files are never overwritten."""
    if not name or "/" in name or name.startswith("."):
        raise SecurityError(f"a key name is a plain file name, got {name!r}")
    folder = Path(directory)
    public, secret = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    for path in (public, secret):
        if path.exists():
            raise SecurityError(f"{path} exists; a key pair is never overwritten (pick another --name, or move "
                                "the old pair away first)")
    folder.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(umask)
    public.chmod(0o644)
    return public, secret


def allowed_keys(folder: Path) -> list[bytes]:
    """The public keys of a folder of allowed peers (every .key file in it); an empty or missing folder is an
    error, because a server that admits nobody is a configuration mistake, never an intent."""
    if not folder.is_dir():
        raise SecurityError(f"the folder of allowed keys {folder} does not exist")
    keys = [load_public_key(path) for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}"))]
    if not keys:
        raise SecurityError(f"the folder of allowed keys {folder} holds no {PUBLIC_SUFFIX} file")
    return keys


# ---- which socket gets which keys ---------------------------------------------------------------------------
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

Refused = Callable[[str], None]
"""Called (from the handshake log's thread) with the reason when a server refuses a connecting socket for good."""


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
            if address and not is_loopback(address) and self.server(domain) is None:
                log.warning("plaintext_on_network", address=address, domain=domain.value,
                            how=f"anyone who reaches {address} can connect and read the traffic: turn CURVE on with "
                                f"{CURVE_ON[domain]} (docs/SECURITY.md), or bind 127.0.0.1")


PLAINTEXT = Security()


def curve_user(frame: zmq.Frame) -> str | None:
    """The public key (Z85) a message's sender authenticated with over CURVE; None over plaintext. (pyzmq's
    authenticator names each admitted CURVE peer by its key, and libzmq attaches that name to its messages.)"""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user if isinstance(user, str) and len(user) == 40 else None


def is_loopback(address: str) -> bool:
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


# ---- the authenticator ------------------------------------------------------------------------------------
class Throttle:
    """Say the same thing at most once per `interval`; `due` returns how many times it was suppressed, or None."""

    def __init__(self, interval: float = REPEAT_LOG_S) -> None:
        self.interval = interval
        self.last: dict[Any, tuple[float, int]] = {}

    def due(self, key: Any, now: float | None = None) -> int | None:
        now = time.monotonic() if now is None else now
        last, suppressed = self.last.get(key, (-float("inf"), 0))
        if now - last >= self.interval:
            self.last[key] = (now, 0)
            return suppressed
        self.last[key] = (last, suppressed + 1)
        return None


class Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler (its own thread), which also logs every refusal with the peer's address and key."""

    def __init__(self, context: zmq.Context) -> None:
        quiet = logging.getLogger("zmserve.zap")  # pyzmq's own lines are debug chatter; ours are below
        quiet.propagate, quiet.disabled = False, True
        super().__init__(context, log=quiet)
        self.folders: dict[str, Path] = {}
        self.throttle = Throttle()
        self.request: list[bytes] = []

    def admit(self, domain: Domain, allowed: Path | frozenset[bytes]) -> None:
        if isinstance(allowed, Path):
            allowed_keys(allowed)  # configure_curve logs and ignores a bad folder: check it first
            self.folders[domain.value] = allowed
            self.configure_curve(domain=domain.value, location=str(allowed))
        else:
            self.certs[domain.value] = {key: True for key in allowed}

    def reload(self) -> None:
        """Read every folder of allowed keys again (key rotation; `zmserve broker|worker|serve` on SIGHUP)."""
        for domain, folder in self.folders.items():
            try:
                allowed_keys(folder)
            except SecurityError as error:
                log.error("allowed_keys_not_reloaded", domain=domain, why=str(error))
                continue
            self.configure_curve(domain=domain, location=str(folder))
        log.info("allowed_keys_reloaded", domains=sorted(self.folders))

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.request = msg
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code != b"200":
            self.log_refusal(status_text.decode(errors="replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)

    def log_refusal(self, why: str) -> None:
        """ZAP request frames: version, request id, domain, address, identity, mechanism, credentials..."""
        if len(self.request) < 6:
            return
        domain, address, mechanism = (frame.decode(errors="replace") for frame in
                                      (self.request[2], self.request[3], self.request[5]))
        credentials = self.request[6:]
        key = zmq.utils.z85.encode(credentials[0]).decode() if mechanism == "CURVE" and credentials \
            and len(credentials[0]) == 32 else None
        suppressed = self.throttle.due((domain, address, key, why))
        if suppressed is not None:
            log.warning("peer_refused", domain=domain, peer=address, key=key, why=why.lower(), repeated=suppressed)


_authenticators: dict[int, tuple[zmq.Context, Authenticator]] = {}
_lock = threading.Lock()


def authenticator(context: zmq.Context) -> Authenticator:
    """The ZAP authenticator of `context`, started on first use (one per context, for the process's life)."""
    with _lock:
        entry = _authenticators.get(id(context))
        if entry is None or entry[0] is not context:
            entry = (context, Authenticator(context))
            entry[1].start()
            _authenticators[id(context)] = entry
        return entry[1]


def reload_allowed_keys() -> None:
    with _lock:
        authenticators = [auth for _, auth in _authenticators.values()]
    for auth in authenticators:
        auth.reload()


# ---- handshakes ---------------------------------------------------------------------------------------------
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_MONITOR_STOPPED)
"""Only the end of each handshake (and the socket's close): nothing arrives per message."""


class Refusal(Enum):
    UNKNOWN_KEY = "the server does not know this side's public key"
    NEEDS_CURVE = "the server requires CURVE and this side has no keys"
    NO_CURVE = "the server does not use CURVE but this side was given keys"
    WRONG_SERVER_KEY = ("the server hung up during the CURVE handshake: the public key this side holds for it is "
                        "not its key (or it does not use CURVE)")
    PROTOCOL = "the CURVE handshake failed"


HUNG_UP = {True: Refusal.WRONG_SERVER_KEY, False: Refusal.NEEDS_CURVE}
"""What a server that hangs up during the handshake, twice in a row, most likely means. Which side notices a
mechanism mismatch first is a race: the other side only sees the connection close."""


def refusal_of(event: int, value: int, curve: bool) -> Refusal | None:
    """What a handshake event on a connecting socket says about this side's keys (None: not a refusal)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return Refusal.UNKNOWN_KEY
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return Refusal.NO_CURVE if curve else Refusal.NEEDS_CURVE
        return Refusal.PROTOCOL
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return HUNG_UP[curve]
    return None


def server_failure(event: int, value: int) -> str | None:
    """What a failed handshake on a binding socket says about the peer (None: nothing worth a line)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return ("a peer hung up during the handshake (it has no CURVE keys, or holds another public key for this "
                "server)")
    if event != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return None  # AUTH: the authenticator logged it, with the peer's address and key
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "a peer without CURVE keys tried to connect"
    if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return "a peer's CURVE hello could not be decrypted: it holds another public key for this server"
    return f"protocol error {_name(value)}"


def _name(value: int) -> str:
    names = [name for name in dir(zmq) if name.startswith("PROTOCOL_ERROR_") and getattr(zmq, name) == value]
    return names[0] if names else hex(value)


class Handshake:
    """A connecting socket's handshakes, read from its monitor by the thread that owns the socket. The monitor is
    readable only when a handshake ends, so a caller polls it next to the socket at no cost per message.

    libzmq does not reconnect after an authentication or mechanism failure, and reconnects (and fails again)
    when the server hangs up mid-handshake (a wrong server key; or a mechanism mismatch the server noticed
    first). A hang-up counts as a refusal only twice in a row, because a server that dies mid-handshake looks the
    same once."""

    def __init__(self, socket: zmq.Socket, curve: bool) -> None:
        self.curve = curve
        # a name of its own: pyzmq's default names the socket's descriptor, which a new socket may reuse while the
        # old monitor's endpoint is still being closed
        self.monitor = socket.get_monitor_socket(HANDSHAKE_EVENTS, addr=f"inproc://zmserve-monitor-{uuid.uuid4().hex}")
        self.refusal: Refusal | None = None
        self.silent_closes = 0

    def read(self) -> Refusal | None:
        """Take every queued event; the refusal if the latest handshake was refused."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return self.refusal
            self.take(event["event"], event["value"])

    def take(self, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.refusal, self.silent_closes = None, 0
            return
        refusal = refusal_of(event, value, self.curve)
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self.silent_closes += 1
            if self.silent_closes < 2:
                return
        if refusal is not None:
            self.refusal = refusal

    def close(self, socket: zmq.Socket) -> None:
        with contextlib.suppress(zmq.ZMQError):
            socket.disable_monitor()
        self.monitor.close(linger=0)


def send_unless_refused(socket: zmq.Socket, frames: list[Any], handshake: Handshake,
                        deadline: float | None = None) -> Refusal | None:
    """Send like a blocking send (waiting for room), but return the refusal instead when the server refused
    this socket: its only connection is then gone for good, and a blocking send would never return. Raises
    TimeoutError at `deadline` (monotonic)."""
    while True:
        try:
            socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return None
        except zmq.Again:
            pass
        if (refusal := handshake.read()) is not None:
            return refusal
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError
        socket.poll(50, zmq.POLLOUT)


@dataclass
class Watched:
    label: str
    server: bool
    curve: bool
    on_refused: Refused | None = None
    endpoint: str = ""
    handshake: Handshake | None = None


class HandshakeLog(threading.Thread):
    """Logs the failed handshakes of the process's CURVE sockets, in a thread of its own (nothing on a request's
    path): a binding socket logs what a refused peer did wrong, a connecting socket what this side must fix."""

    def __init__(self) -> None:
        super().__init__(name="zmserve-handshakes", daemon=True)
        self.added: queue.SimpleQueue[Watched] = queue.SimpleQueue()
        self.throttle = Throttle()

    def watch(self, socket: zmq.Socket, watched: Watched) -> None:
        """Called by the socket's owner before it binds or connects; the monitor goes to this thread."""
        watched.handshake = Handshake(socket, watched.curve)
        self.added.put(watched)

    def run(self) -> None:
        poller = zmq.Poller()
        watching: dict[zmq.Socket, Watched] = {}
        while True:
            while not self.added.empty():
                watched = self.added.get()
                assert watched.handshake is not None
                watched.handshake.monitor.setsockopt(zmq.LINGER, 0)
                watching[watched.handshake.monitor] = watched
                poller.register(watched.handshake.monitor, zmq.POLLIN)
            try:
                ready = poller.poll(100)
            except zmq.ContextTerminated:  # some context is terminating: let go of its monitors, keep the others
                for monitor in [m for m in watching if terminated(m)]:
                    self.forget(poller, watching, monitor)
                continue
            for monitor, _ in ready:
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    continue
                except zmq.ContextTerminated:
                    self.forget(poller, watching, monitor)
                    continue
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:  # the socket was closed
                    self.forget(poller, watching, monitor)
                    continue
                self.report(watching[monitor], event)

    @staticmethod
    def forget(poller: zmq.Poller, watching: dict[zmq.Socket, Watched], monitor: zmq.Socket) -> None:
        poller.unregister(monitor)
        monitor.close(linger=0)
        watching.pop(monitor, None)

    def report(self, watched: Watched, event: dict) -> None:
        endpoint = event["endpoint"].decode(errors="replace")
        if watched.server:
            why = server_failure(event["event"], event["value"])
            if why is not None and (suppressed := self.throttle.due((endpoint, why))) is not None:
                log.warning("handshake_failed", domain=watched.label, endpoint=endpoint, why=why, repeated=suppressed)
            return
        assert watched.handshake is not None
        watched.handshake.take(event["event"], event["value"])
        refusal = watched.handshake.refusal
        if refusal is None or event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return
        if (suppressed := self.throttle.due((endpoint, refusal))) is not None:
            log.error("handshake_refused", link=watched.label, endpoint=endpoint, why=refusal.value,
                      repeated=suppressed)
        if watched.on_refused is not None and event["event"] != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            watched.on_refused(f"the {watched.label} at {endpoint} refused this process: {refusal.value}")


def terminated(socket: zmq.Socket) -> bool:
    try:
        socket.getsockopt(zmq.EVENTS)
    except zmq.ContextTerminated:
        return True
    return False


_handshake_log: HandshakeLog | None = None


def handshake_log() -> HandshakeLog:
    global _handshake_log
    with _lock:
        if _handshake_log is None:
            _handshake_log = HandshakeLog()
            _handshake_log.start()
        return _handshake_log
