"""TLS for MindSpore's own traffic inside a stage, which CURVE cannot cover: each stage's scheduler and its
members talk over MindSpore's dynamic-cluster TCP links, and the CPU collectives (AllReduce, AllGather) of a
model call run over them too, so without this the activations a stage's ranks exchange cross the network in
clear.

MindSpore 2.10 secures that cluster with TLS when `set_ps_context(enable_ssl=True, config_file_path=...,
client_password=..., server_password=...)` is called before `mindspore.communication.init()`: every process of
the group then presents a certificate and checks its peers' against one CA (mutual TLS; a member whose
certificate another CA signed cannot join). Measured on CPU (docs/SECURITY.md): the group forms, the collectives
run, and their tensors no longer appear on the wire. MindSpore refuses keys under 3072-bit RSA and a PKCS#12 file
that carries its CA chain.

A folder holds one cluster's material (`zmserve keys collective-tls DIR` writes it with the openssl command):

    ca.crt       the CA that signed both certificates (PEM)
    server.p12   certificate + key a process presents when it accepts a connection (PKCS#12, password)
    client.p12   certificate + key a process presents when it connects (PKCS#12, password)
    password     the PKCS#12 password (one line; readable by its owner only)

Every machine of the cluster (the worker's, for the schedulers, and each agent machine) gets a copy of the same
folder: MindSpore authenticates cluster membership, not individual machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENVIRONMENT = "ZMSERVE_COLLECTIVE_TLS"
"""How a scheduler process (`python -m zmserve.collective`) learns the folder from the worker that starts it."""
CIPHERS = ("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:"
           "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305")
FILES = ("ca.crt", "server.p12", "client.p12", "password")
RSA_BITS = 3072
"""MindSpore's TLS refuses smaller RSA keys ("ee key too small")."""
VALID_DAYS = 365


class CollectiveTlsError(ValueError):
    """A folder that cannot secure a group; one line for the user."""


@dataclass(frozen=True)
class CollectiveTls:
    folder: Path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CollectiveTls:
        path = Path(folder).resolve()
        missing = [name for name in FILES if not (path / name).is_file()]
        if missing:
            raise CollectiveTlsError(f"--collective-tls {folder} lacks {', '.join(missing)} (`zmserve keys "
                                     "collective-tls DIR` writes a complete folder)")
        if not (path / "password").read_text().strip():
            raise CollectiveTlsError(f"--collective-tls {folder}: the password file is empty")
        return cls(path)

    def config_file(self) -> Path:
        """MindSpore's configuration file for this folder, in a private file of this machine's temporary folder
        (absolute paths, so the folder may live anywhere; the same file for the same folder, never piling up)."""
        document = {"server_cert_path": str(self.folder / "server.p12"),
                    "client_cert_path": str(self.folder / "client.p12"),
                    "ca_cert_path": str(self.folder / "ca.crt"),
                    "crl_path": str(self.folder / "crl.pem") if (self.folder / "crl.pem").is_file() else "",
                    "cipher_list": CIPHERS, "cert_expire_warning_time_in_day": 30}
        name = hashlib.sha256(str(self.folder).encode()).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / f"zmserve-collective-tls-{os.getuid()}-{name}.json"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(document, file)
        return path

    def apply(self) -> None:
        """In a process about to call `mindspore.communication.init()` (a scheduler or a member)."""
        from zmserve.collective import import_mindspore

        ms = import_mindspore()
        password = (self.folder / "password").read_text().strip()
        ms.set_ps_context(enable_ssl=True, config_file_path=str(self.config_file()), client_password=password,
                          server_password=password)


def from_environment() -> CollectiveTls | None:
    folder = os.environ.get(ENVIRONMENT)
    return CollectiveTls.load(folder) if folder else None


def generate(directory: str | os.PathLike) -> Path:
    """`zmserve keys collective-tls DIR`: a CA, a server and a client certificate it signs (RSA 3072), both as
    PKCS#12 under a random password. The CA's key is not kept: to renew, write a new folder and hand it to every
    machine (docs/SECURITY.md)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CollectiveTlsError("the openssl command is needed to write certificates (apt-get install openssl)")
    folder = Path(directory)
    taken = [name for name in FILES if (folder / name).exists()]
    if taken:
        raise CollectiveTlsError(f"{folder} already holds {', '.join(taken)}; a folder is never overwritten")
    folder.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    umask = os.umask(0o077)
    try:
        (folder / "password").write_text(password + "\n")
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)

            def run(*args: str) -> None:
                done = subprocess.run([openssl, *args], capture_output=True, text=True)
                if done.returncode != 0:
                    raise CollectiveTlsError(f"openssl {args[0]} failed: {done.stderr.strip()}")

            run("req", "-x509", "-newkey", f"rsa:{RSA_BITS}", "-nodes", "-keyout", str(work / "ca.key"),
                "-out", str(folder / "ca.crt"), "-days", str(VALID_DAYS), "-subj", "/CN=zmserve collective CA",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
            extensions = work / "extensions"
            extensions.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                  "extendedKeyUsage=serverAuth,clientAuth\n")
            for role in ("server", "client"):
                run("req", "-newkey", f"rsa:{RSA_BITS}", "-nodes", "-keyout", str(work / f"{role}.key"),
                    "-out", str(work / f"{role}.csr"), "-subj", f"/CN=zmserve collective {role}")
                run("x509", "-req", "-in", str(work / f"{role}.csr"), "-CA", str(folder / "ca.crt"),
                    "-CAkey", str(work / "ca.key"), "-CAserial", str(work / "ca.srl"), "-CAcreateserial",
                    "-out", str(work / f"{role}.crt"),
                    "-days", str(VALID_DAYS), "-sha256", "-extfile", str(extensions))
                run("pkcs12", "-export", "-in", str(work / f"{role}.crt"), "-inkey", str(work / f"{role}.key"),
                    "-out", str(folder / f"{role}.p12"), "-passout", f"file:{folder / 'password'}")
    finally:
        os.umask(umask)
    (folder / "ca.crt").chmod(0o644)
    return folder
