"""A whole deployment on this machine: broker, worker and agent launcher(s), each a real `zmserve` process on
free loopback ports. Tests and benchmarks use it; every process is reaped by `stop()`."""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zmserve.client import Client, ClientError
from zmserve.protocol import ErrorCode
from zmserve.security import generate_key_pair
from zmserve.supervision import reap
from zmserve.transport import free_port, free_port_range

READY_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class ClusterKeys:
    """docs/SECURITY.md's key layout in one folder: a pair per role (and per agent machine: host-a, host-b), and
    one folder of allowed public keys per kind of peer (clients/, workers/, agents/)."""

    root: Path
    ROLES = ("broker", "worker", "client", "gateway", "host-a", "host-b")
    ALLOWED = {"clients": ("client", "gateway"), "workers": ("worker",), "agents": ("host-a", "host-b")}

    @classmethod
    def generate(cls, root: Path) -> ClusterKeys:
        for name in cls.ROLES:
            generate_key_pair(root, name)
        for folder, names in cls.ALLOWED.items():
            (root / folder).mkdir()
            for name in names:
                shutil.copy(root / f"{name}.key", root / folder)
        return cls(root)

    def secret(self, name: str) -> str:
        return str(self.root / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.root / f"{name}.key")

    def allowed(self, folder: str) -> str:
        return str(self.root / folder)


class LocalCluster:
    """A broker, a worker and agent launchers; logs go to `workdir/<name>.log`, at debug level so that tests can
    follow every membership event. Without a servable_dir, the broker alone (for tests that script their own
    worker).

    `colocated=True` runs `zmserve serve` (broker and worker in one process) instead of `zmserve broker` +
    `zmserve worker`; its process and log are then both `worker` and `broker`.

    Every broker, worker and gateway serves Prometheus metrics on a free port: `metrics[name]` is its URL.
    `curve=True` runs every link with CURVE and `--require-curve` (keys in `workdir/keys`, `ClusterKeys`); the
    agents of `start_agents` are machine host-a unless `--secret-key` names another pair.

    `standby=False` (the default) runs agents and workers with `--no-standby`: no idle process per agent and per
    stage importing MindSpore beside the ones that serve (on a small machine they double the CPU a cluster takes
    while it forms). Tests of restarts and the benchmarks that time them ask for `standby=True`."""

    def __init__(self, workdir: Path, servable_dir: Path | None, servable: str, model_files: list[Path] | None,
                 extra_worker_args: list[str] | None = None, extra_agent_args: list[str] | None = None,
                 extra_broker_args: list[str] | None = None, colocated: bool = False, curve: bool = False,
                 standby: bool = False) -> None:
        self.workdir = workdir
        self.standby_args = [] if standby else ["--no-standby"]
        self.keys = ClusterKeys.generate(workdir / "keys") if curve else None
        self.colocated = colocated
        self.client_address = f"tcp://127.0.0.1:{free_port()}"
        self.worker_address = f"tcp://127.0.0.1:{free_port()}"
        self.distributed_address = f"127.0.0.1:{free_port()}"
        self.servable = servable
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.metrics: dict[str, str] = {}
        self.worker_names = {"worker"}
        """The processes that are workers (stopped after the launchers, before the broker)."""
        if servable_dir is None:
            self.start("broker", ["broker", "--bind", self.client_address, "--worker-bind", self.worker_address,
                                  *self.curve_args("broker"), *(extra_broker_args or [])])
            return
        worker_args = ["--servable-dir", str(servable_dir), "--servable", servable,
                       "--distributed-address", self.distributed_address, *self.standby_args,
                       *(extra_worker_args or [])]
        if colocated:
            self.start("worker", ["serve", "--bind", self.client_address, *self.curve_args("serve"),
                                  *(extra_broker_args or []), *worker_args])
            self.processes["broker"], self.logs["broker"] = self.processes["worker"], self.logs["worker"]
            self.metrics["broker"] = self.metrics["worker"]
        else:
            self.start("broker", ["broker", "--bind", self.client_address, "--worker-bind", self.worker_address,
                                  *self.curve_args("broker"), *(extra_broker_args or [])])
            self.start("worker", ["worker", *worker_args, "--broker", self.worker_address, *self.curve_args("worker")])
        if model_files is not None:
            self.start_agents("agents", model_files, *(extra_agent_args or []))

    def start_worker(self, name: str, servable_dir: Path, servable: str, *extra: str) -> str:
        """One more `zmserve worker` registering with this cluster's broker (a replica, or another version of the
        servable), on a distributed address of its own, which it returns (for its launchers' `worker`)."""
        address = f"127.0.0.1:{free_port()}"
        self.worker_names.add(name)
        self.start(name, ["worker", "--servable-dir", str(servable_dir), "--servable", servable,
                          "--distributed-address", address, "--broker", self.worker_address, *self.standby_args,
                          *extra])
        return address

    def start_agents(self, name: str, model_files: list[Path], *extra: str, worker: str | None = None) -> None:
        """One `zmserve agent` launcher for these model files (several launchers = several machines), for this
        cluster's worker or the one at `worker` (a distributed address from `start_worker`)."""
        self.start(name, ["agent", "--worker", worker or self.distributed_address,
                          "--model-files", ",".join(str(p) for p in model_files),
                          "--agent-start-port", str(free_port_range(len(model_files))), *self.curve_args("agent"),
                          *self.standby_args, *extra])

    def curve_args(self, command: str) -> list[str]:
        """The key options of each command of this cluster (none without `curve`)."""
        keys = self.keys
        if keys is None:
            return []
        worker = "broker" if self.colocated else "worker"  # `serve`'s one key pair is the broker's and the worker's
        return {
            "broker": ["--secret-key", keys.secret("broker"), "--client-keys", keys.allowed("clients"),
                       "--worker-keys", keys.allowed("workers")],
            "serve": ["--secret-key", keys.secret("broker"), "--client-keys", keys.allowed("clients"),
                      "--agent-keys", keys.allowed("agents")],
            "worker": ["--secret-key", keys.secret("worker"), "--broker-key", keys.public("broker"),
                       "--agent-keys", keys.allowed("agents")],
            "agent": ["--secret-key", keys.secret("host-a"), "--worker-key", keys.public(worker)],
            "gateway": ["--secret-key", keys.secret("gateway"), "--broker-key", keys.public("broker")],
        }[command] + ["--require-curve"]

    def start(self, name: str, args: list[str]) -> None:
        if args[0] in ("broker", "worker", "serve", "gateway") and "--metrics-bind" not in args:
            port = free_port()
            args = [*args, "--metrics-bind", f"127.0.0.1:{port}"]
            self.metrics[name] = f"http://127.0.0.1:{port}/metrics"
        log_path = self.workdir / f"{name}.log"
        self.logs[name] = log_path
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "zmserve.cli", "--log-level", "debug", *args], stdout=subprocess.DEVNULL,
            stderr=log_path.open("w"), env={**os.environ, "GLOG_v": "3"},
        )

    def start_gateway(self, name: str = "gateway", *extra: str, timeout: float = 30.0, cafile: str | None = None,
                      token: str | None = None) -> str:
        """A `zmserve gateway` in front of this cluster's broker on a free port; its base URL once it answers.
        With `cafile` it is asked over HTTPS (its --certfile is in `extra`), with `token` as a bearer."""
        port = free_port()
        self.start(name, ["gateway", "--bind", f"127.0.0.1:{port}", "--broker", self.client_address,
                          *self.curve_args("gateway"), *extra])
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if cafile is None:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            else:
                connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=1,
                                                         context=ssl.create_default_context(cafile=cafile))
            try:
                connection.request("GET", "/v2/health/live", headers=headers)
                if connection.getresponse().status == 200:
                    return f"{'http' if cafile is None else 'https'}://127.0.0.1:{port}"
            except OSError:
                pass
            finally:
                connection.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not answer within {timeout} s\n{self.log_tails()}")
            time.sleep(0.05)

    def client(self, method: str = "predict", servable: str | None = None, version: int = 0) -> Client:
        if self.keys is None:
            return Client(self.client_address, servable or self.servable, method, version)
        return Client(self.client_address, servable or self.servable, method, version,
                      server_public_key=self.keys.public("broker"), secret_key=self.keys.secret("client"))

    def wait_ready(self, instance: dict[str, Any], method: str = "predict",
                   timeout: float = READY_TIMEOUT_S) -> None:
        """Call until the servable answers something other than 'not there yet', or fail with the logs."""
        deadline = time.monotonic() + timeout
        with self.client(method) as client:
            while True:
                self.check_alive()
                try:
                    client.infer(instance, timeout=30)
                    break
                except ClientError as error:
                    if error.code not in (ErrorCode.UNAVAILABLE, ErrorCode.NOT_FOUND):
                        raise
                    if time.monotonic() > deadline:
                        raise AssertionError(f"not ready after {timeout} s: {error}\n{self.log_tails()}") from None
                time.sleep(0.2)
        self.wait_broker_settled(deadline)

    def wait_broker_settled(self, deadline: float) -> None:
        """Until the broker has left its first heartbeat intervals, in which it answers a servable it has not heard
        of UNAVAILABLE (its workers may not have re-announced yet) instead of NOT_FOUND: a ready cluster answers
        every request as it will from then on. Asks for a servable no worker serves."""
        with self.client("predict", servable="zmserve-no-such-servable") as probe:
            while True:
                try:
                    probe.infer({}, timeout=5)
                    return
                except ClientError as error:
                    if error.code != ErrorCode.UNAVAILABLE or "not known yet" not in error.message:
                        return
                    if time.monotonic() > deadline:
                        raise AssertionError(f"the broker still says: {error}") from None
                time.sleep(0.2)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}\n{self.log_tails()}")

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for name, path in self.logs.items():
            text = path.read_text().splitlines()[-lines:] if path.exists() else []
            parts.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> dict[str, int]:
        """SIGTERM everything (launchers first, then workers, then the broker), reap it, return the exit codes."""
        codes = {}
        workers = [name for name in self.processes if name in self.worker_names]
        launchers = [name for name in self.processes if name not in self.worker_names and name != "broker"]
        for name in [*launchers, *workers, "broker"]:
            if name in self.processes and name not in codes:
                codes[name] = reap(self.processes[name], timeout=20)
        return codes
