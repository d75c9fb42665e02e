"""The gateway's HTTP security: HTTPS (`--certfile`/`--keyfile`, uvicorn's TLS) and an optional bearer token
(`--auth-token-file`) that every request must carry.

The token is compared in constant time (`hmac.compare_digest` over SHA-256 digests, so neither its content nor
its length leaks through the time a refusal takes). A refused request gets 401 with `WWW-Authenticate: Bearer`
before its body is read, and is logged with the caller's address. Without TLS a token crosses the network in
clear, so the gateway warns at start when it listens beyond loopback without `--certfile`.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zmserve.logs import get_logger
from zmserve.security import is_local_address

log = get_logger("gateway")

SCHEME = b"bearer"


@dataclass(frozen=True)
class TlsFiles:
    certfile: str
    keyfile: str


class BearerToken:
    def __init__(self, token: bytes) -> None:
        self.digest = hashlib.sha256(token).digest()

    def allows(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether the request's `Authorization: Bearer <token>` carries the token (the scheme's case is free)."""
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                return scheme.lower() == SCHEME and hmac.compare_digest(
                    hashlib.sha256(token.strip()).digest(), self.digest)
        return False


def read_token(path: str | Path) -> bytes:
    """The token of `--auth-token-file`: the file's content without surrounding whitespace, not empty."""
    token = Path(path).read_bytes().strip()
    if not token:
        raise ValueError(f"--auth-token-file {path} is empty")
    if any(byte < 0x21 or byte > 0x7E for byte in token):
        raise ValueError(f"--auth-token-file {path}: a bearer token is printable ASCII without spaces")
    return token


def http_security(bind: str, certfile: str | None, keyfile: str | None,
                  token_file: str | None) -> tuple[TlsFiles | None, bytes | None]:
    """Check `--certfile`/`--keyfile` (loaded once here, so a bad pair fails the command at start) and read the
    token; warn about what crosses the network in clear."""
    tls = None
    if (certfile is None) != (keyfile is None):
        raise ValueError("--certfile and --keyfile go together (HTTPS needs the certificate and its private key)")
    if certfile is not None and keyfile is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
        except ssl.SSLError as error:
            raise ValueError(f"--certfile {certfile} / --keyfile {keyfile}: {error.reason or error}") from None
        tls = TlsFiles(certfile, keyfile)
    token = read_token(token_file) if token_file is not None else None
    if tls is None and not is_local_address(bind):
        log.warning("plaintext_on_network", address=bind, domain="http",
                    how="requests, their tensors and any bearer token cross the network in clear: serve HTTPS with "
                        "--certfile and --keyfile (docs/SECURITY.md), or bind 127.0.0.1")
    return tls, token


def client_address(scope: dict[str, Any]) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None
