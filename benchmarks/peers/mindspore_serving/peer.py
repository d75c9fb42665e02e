"""MindSpore Serving 2.0.2 (the peer) as a benchmark reference that a script can start, call and stop between its
own zmserve measurements, so both are measured in the same run.

The peer is installed once by `../shared/peers/mindspore-serving/setup.sh` (from the project root; $PEER_DIR
overrides where its scripts are). `running_peer` exports the peer's models with its own MindSpore 2.0, starts its
`serve.py` on free loopback ports in a scratch folder of ours (so it never takes the fixed ports 5500/1500 of
`server_ctl.sh`), and stops it by pid. The whole time it holds the team's peer lock (`flock` on
/tmp/zmserve-peer.lock, the same lock the `flock` command takes), so no other engineer's peer run shares the
machine with ours. Measurements are the peer's own client, `bench_client.py` (one OS process per client).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
PEER_DIR = Path(os.environ.get("PEER_DIR") or (REPO / ".." / "shared" / "peers" / "mindspore-serving")).resolve()
ANCHOR = Path(os.environ.get("ANCHOR") or Path.home() / ".cache" / "zmserve-peers" / "mindspore-serving")
PEER_LOCK = Path("/tmp/zmserve-peer.lock")
PEER_PYENV = "3.11.7:3.9.18:3.7.16"
START_TIMEOUT_S = 120.0
MODELS = {"matmul": ["--m", "128", "--k", "96", "--n", "16"],
          "neg_big": ["--m", "4096", "--k", "1024", "--n", "0"]}
"""The peer's servables we call, with bench_client.py's shape arguments (n 0 = the Neg-only model)."""


class PeerError(RuntimeError):
    """The peer is not installed, or did not start."""


def peer_environment() -> dict[str, str]:
    """The environment of the peer's env.sh: its Lite runtime on the library path."""
    lite = ANCHOR / "lite_lib"
    return {**os.environ, "PYENV_VERSION": PEER_PYENV, "GLOG_v": "2",
            "LD_LIBRARY_PATH": f"{lite / '_c_lite'}:{lite}"}


@dataclass
class Peer:
    """A running peer server: where its gRPC listens, and how to drive its benchmark client."""

    grpc_address: str
    workdir: Path

    def bench_client(self, *args: str, timeout: float = 900) -> dict[str, Any]:
        """One `bench_client.py` run against this server; its JSON line."""
        env = {**peer_environment(), "MS_GRPC_ADDR": self.grpc_address}
        done = subprocess.run([str(ANCHOR / "venv" / "bin" / "python"), str(PEER_DIR / "bench_client.py"), *args],
                              capture_output=True, text=True, env=env, timeout=timeout, cwd=self.workdir)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise PeerError(f"bench_client.py {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
        return json.loads(lines[-1])

    def latency(self, servable: str, requests: int, warmup: int = 20) -> dict[str, Any]:
        """Closed loop, one client, `requests` calls: p50/p99 ms."""
        return self.bench_client("lat", "--proto", "grpc", "--servable", servable, *MODELS[servable],
                                 "--requests", str(requests), "--warmup", str(warmup))

    def throughput(self, servable: str, clients: int, duration: float, warmup: int = 20) -> dict[str, Any]:
        """`clients` OS processes, closed loop, for `duration` seconds: req/s."""
        return self.bench_client("tput", "--proto", "grpc", "--servable", servable, *MODELS[servable],
                                 "--conc", str(clients), "--duration", str(duration), "--warmup", str(warmup))


@contextlib.contextmanager
def peer_lock() -> Iterator[None]:
    """Hold the team's peer lock (exclusive flock on /tmp/zmserve-peer.lock) while the block runs."""
    with PEER_LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def export_models(workdir: Path) -> Path:
    """The peer's servables folder in `workdir`, its models exported by its own MindSpore (once per folder)."""
    servables = workdir / "servables"
    if (servables / "neg_big" / "1" / "neg_big.mindir").is_file():
        return servables
    for name in MODELS:
        (servables / name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy(PEER_DIR / "servable_configs" / f"{name}.py", servables / name / "servable_config.py")
    done = subprocess.run([str(ANCHOR / "venv" / "bin" / "python"), str(PEER_DIR / "export_model.py"),
                           str(servables)], capture_output=True, text=True, env=peer_environment(), timeout=600)
    if done.returncode != 0:
        raise PeerError(f"exporting the peer's models failed: {done.stderr[-2000:]}")
    return servables


@contextlib.contextmanager
def running_peer(workdir: Path) -> Iterator[Peer]:
    """The peer serving matmul and neg_big on free loopback ports, under the peer lock; stopped (SIGTERM, then
    SIGKILL) and reaped on the way out."""
    from zmserve.transport import free_port

    if not (ANCHOR / "venv" / "bin" / "python").is_file():
        raise PeerError(f"MindSpore Serving is not installed in {ANCHOR}: run {PEER_DIR / 'setup.sh'}")
    workdir.mkdir(parents=True, exist_ok=True)
    with peer_lock():
        servables = export_models(workdir)
        grpc_port, rest_port = free_port(), free_port()
        log_path = workdir / "peer_server.log"
        with log_path.open("w") as log:
            server = subprocess.Popen([str(ANCHOR / "venv" / "bin" / "python"), str(PEER_DIR / "serve.py"),
                                       str(servables), str(grpc_port), str(rest_port), *MODELS],
                                      stdout=log, stderr=subprocess.STDOUT, env=peer_environment(), cwd=workdir,
                                      start_new_session=True)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while "SERVING_READY" not in log_path.read_text():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise PeerError(f"the peer did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            yield Peer(f"127.0.0.1:{grpc_port}", workdir)
        finally:
            stop(server)


def stop(server: subprocess.Popen) -> None:
    """SIGTERM the peer's process group (its workers are children), SIGKILL after 30 s; reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, 15)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 9)
        server.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, 9)  # anything of its group still running
