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

One concern per module: keys.py (key files), domains.py (what is secured, by name), policy.py (which socket gets
which keys), zap.py (whom a binding socket admits), handshake.py (what a failed handshake means, and its log),
throttle.py (saying it once).
"""

from zmserve.security.domains import ALLOWED_FLAG, CURVE_ON, PEER_FLAG, Domain, Peer
from zmserve.security.handshake import (
    HANDSHAKE_EVENTS,
    HUNG_UP,
    Handshake,
    HandshakeLog,
    Refusal,
    Refused,
    Watched,
    handshake_log,
    refusal_of,
    send_unless_refused,
    server_failure,
    terminated,
)
from zmserve.security.keys import (
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    KeyPair,
    SecurityError,
    allowed_keys,
    generate_key_pair,
    load_public_key,
)
from zmserve.security.policy import (
    PLAINTEXT,
    Curve,
    CurveClient,
    CurveServer,
    Security,
    client_curve,
    is_local_address,
)
from zmserve.security.throttle import REPEAT_LOG_S, Throttle
from zmserve.security.zap import Authenticator, authenticator, curve_user, reload_allowed_keys

__all__ = [
    "ALLOWED_FLAG", "CURVE_ON", "HANDSHAKE_EVENTS", "HUNG_UP", "PEER_FLAG", "PLAINTEXT", "PUBLIC_SUFFIX",
    "REPEAT_LOG_S", "SECRET_SUFFIX", "Authenticator", "Curve", "CurveClient", "CurveServer", "Domain", "Handshake",
    "HandshakeLog", "KeyPair", "Peer", "Refusal", "Refused", "Security", "SecurityError", "Throttle", "Watched",
    "allowed_keys", "authenticator", "client_curve", "curve_user", "generate_key_pair", "handshake_log",
    "is_local_address", "load_public_key", "refusal_of", "reload_allowed_keys", "send_unless_refused",
    "server_failure", "terminated",
]
