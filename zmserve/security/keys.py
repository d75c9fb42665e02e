"""CURVE key files: a key pair per process (`zmserve keys generate`), public keys of servers and folders of
allowed peers' public keys, read and checked at start so that a wrong path fails in one line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


class SecurityError(ValueError):
    """A key file, a folder of keys or a combination of options that cannot work; one line for the user."""


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
