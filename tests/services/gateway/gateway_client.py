"""Calling a gateway the way its users do: real curl (a subprocess) and raw HTTP/1.1 on a socket."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any


def curl(url: str, path: str, body: bytes = b"", method: str = "POST", *extra: str) -> tuple[int, Any]:
    """curl's answer: (HTTP status, JSON body or None when empty)."""
    done = subprocess.run(["curl", "-sS", "-X", method, "--data-binary", "@-", "-H", "Content-Type: application/json",
                           "-w", "\n%{http_code}", *extra, url + path], input=body, capture_output=True, timeout=120,
                          check=True)
    text, status = done.stdout.rsplit(b"\n", 1)
    return int(status), json.loads(text) if text else None


def raw_request(host: str, port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> socket.socket:
    """A connection that has sent `head` and `body` (maybe only part of what its Content-Length promises)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.sendall(head + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM), made by the openssl command line."""
    import shutil

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key
