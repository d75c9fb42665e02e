"""The process's ZAP authenticator (pyzmq's, one per ZeroMQ context, in its own thread): which public keys each
domain admits, reloaded on SIGHUP, and a log line for every refused peer."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import zmq
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from zmserve.logs import get_logger
from zmserve.security.domains import Domain
from zmserve.security.keys import SecurityError, allowed_keys
from zmserve.security.throttle import Throttle

log = get_logger("security")


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


def curve_user(frame: zmq.Frame) -> str | None:
    """The public key (Z85) a message's sender authenticated with over CURVE; None over plaintext. (pyzmq's
    authenticator names each admitted CURVE peer by its key, and libzmq attaches that name to its messages.)"""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user if isinstance(user, str) and len(user) == 40 else None
