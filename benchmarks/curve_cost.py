"""What CURVE costs (docs/SECURITY.md, docs/BENCHMARKS.md §13): the same requests with every link plaintext and
with every link CURVE (and, for MatMul, also MindSpore's TLS inside the stage: --collective-tls), measured in one
session, configurations alternating within each round.

    .venv/bin/python -m benchmarks.curve_cost [--rounds 2] [--requests 500] [--big-requests 10]

Rows (one JSON line each, with the load average and this command):
- raw_rtt: a 1 KiB message to an echo process and back over one DEALER/ROUTER link (ZeroMQ alone), p50 in µs;
- raw_16MiB: the same with 16 MiB, p50 and MiB/s (each way);
- service_p50: MatMul rank_size 2 (128x96 float32 in), one client calling `infer` in a loop, p50/p99;
- service_16MiB: 16 MiB through Neg (rank_size 1, y = -x): p50 and MiB/s.
The client runs in this process; clusters are `LocalCluster`s (broker, worker, launcher), all up at once.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from benchmarks.benchlib import cmdline, emit, export_matmul, wait_quiet, write_servable
from benchmarks.export_identity import export
from zmserve.client import ClientError
from zmserve.collective_tls import generate as generate_collective_tls
from zmserve.local import ClusterKeys, LocalCluster
from zmserve.security import CurveClient, CurveServer, Domain, KeyPair, load_public_key
from zmserve.transport import bind, free_port, new_socket

CONFIGS = ("plaintext", "curve")
BIG_MIB = 16


# ---- one ZeroMQ link, nothing else ----------------------------------------------------------------------------
def echo_server(address: str, keys_dir: str) -> None:
    """ROUTER: send every message straight back (CURVE when `keys_dir` is not empty)."""
    curve = None
    if keys_dir:
        keys = ClusterKeys(Path(keys_dir))
        curve = CurveServer(KeyPair.load(keys.secret("broker")), Domain.CLIENTS, Path(keys.allowed("clients")))
    socket = new_socket(zmq.Context.instance(), zmq.ROUTER, curve=curve)
    bind(socket, address, "echo server")
    while True:
        frames = socket.recv_multipart(copy=False)
        socket.send_multipart(frames, copy=False)
        if frames[1].bytes == b"stop":
            break
    socket.close(linger=100)


def raw_round_trips(keys: ClusterKeys | None, payload: bytes, count: int) -> list[float]:
    address = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, "-m", __spec__.name, "--echo-server", address,
                               "--keys", str(keys.root) if keys else ""])
    curve = None if keys is None else CurveClient(KeyPair.load(keys.secret("client")),
                                                  load_public_key(keys.public("broker")), watch=False)
    socket = new_socket(zmq.Context.instance(), zmq.DEALER, curve=curve)
    socket.connect(address)
    times = []
    try:
        for number in range(count + 3):
            started = time.perf_counter()
            socket.send(payload, copy=False)
            back = socket.recv(copy=False)
            if number >= 3:
                times.append(time.perf_counter() - started)
            assert len(back) == len(payload)
        socket.send(b"stop")
        socket.recv()
    finally:
        socket.close(linger=0)
        server.wait(30)
    return times


# ---- through a cluster ----------------------------------------------------------------------------------------
def service_times(cluster: LocalCluster, instance: dict, count: int) -> tuple[list[float], int]:
    """Latencies of the answered calls (after 3 unrecorded ones) and how many failed (a loaded machine can lose
    a worker's heartbeat; the row says so instead of the run dying)."""
    times, errors = [], 0
    with cluster.client() as client:
        for number in range(count + 3):
            started = time.perf_counter()
            try:
                client.infer(instance, timeout=120)
            except ClientError:
                errors += 1
                continue
            if number >= 3:
                times.append(time.perf_counter() - started)
    return times, errors


def summary(times: list[float], nbytes: int | None = None) -> dict:
    if not times:
        return {"n": 0}
    p50 = float(np.percentile(times, 50))
    row = {"n": len(times), "p50_ms": round(p50 * 1000, 4), "p99_ms": round(float(np.percentile(times, 99)) * 1000, 4)}
    if nbytes is not None:
        row["MiB_per_s"] = round(nbytes / 2**20 / p50, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--big-requests", type=int, default=10)
    parser.add_argument("--echo-server", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keys", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server(args.echo_server, args.keys)
        return
    big = np.ones((BIG_MIB * 2**20 // 4 // 1024, 1024), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        keys = ClusterKeys.generate(work / "keys")
        tls = str(generate_collective_tls(work / "collective"))
        matmul = export_matmul(work / "matmul", 2)
        matmul_servables = write_servable(work / "servables", "matmul", 2)
        neg = export(work / "neg")
        neg_servables = write_servable(work / "servables", "neg", 1)
        clusters: dict[tuple[str, str], LocalCluster] = {}
        try:
            for config in (*CONFIGS, "curve+collective_tls"):
                (work / config / "matmul").mkdir(parents=True)
                (work / config / "neg").mkdir(parents=True)
                tls_args = ["--collective-tls", tls] if config.endswith("collective_tls") else []
                clusters["matmul", config] = LocalCluster(work / config / "matmul", matmul_servables, "matmul", None,
                                                          tls_args, curve=config != "plaintext", standby=True)
                clusters["matmul", config].start_agents("agents", matmul, *tls_args)
            for config in CONFIGS:
                clusters["neg", config] = LocalCluster(work / config / "neg", neg_servables, "neg", [neg],
                                                       curve=config != "plaintext", standby=True)
            for (servable, _), cluster in clusters.items():
                instance = {"x": np.ones((128, 96) if servable == "matmul" else (2, 3), np.float32)}
                cluster.wait_ready(instance)
            x = {"x": np.random.default_rng(0).standard_normal((128, 96)).astype(np.float32)}
            for round_number in range(args.rounds):
                for config in CONFIGS:
                    load = wait_quiet()
                    times = raw_round_trips(keys if config == "curve" else None, b"x" * 1024, args.requests)
                    emit({"row": "raw_rtt", "config": config, "round": round_number, "load1": load,
                          "p50_us": round(float(np.percentile(times, 50)) * 1e6, 1), "command": cmdline()})
                for config in CONFIGS:
                    load = wait_quiet()
                    times = raw_round_trips(keys if config == "curve" else None, big.tobytes(), args.big_requests)
                    emit({"row": f"raw_{BIG_MIB}MiB", "config": config, "round": round_number, "load1": load,
                          **summary(times, big.nbytes), "command": cmdline()})
                for config in (*CONFIGS, "curve+collective_tls"):
                    load = wait_quiet()
                    times, errors = service_times(clusters["matmul", config], x, args.requests)
                    emit({"row": "service_p50", "servable": "matmul rank_size 2", "config": config,
                          "round": round_number, "load1": load, **summary(times), "errors": errors,
                          "command": cmdline()})
                for config in CONFIGS:
                    load = wait_quiet()
                    times, errors = service_times(clusters["neg", config], {"x": big}, args.big_requests)
                    emit({"row": f"service_{BIG_MIB}MiB", "servable": "neg rank_size 1", "config": config,
                          "round": round_number, "load1": load, **summary(times, big.nbytes), "errors": errors,
                          "command": cmdline()})
        finally:
            for cluster in clusters.values():
                cluster.stop()


if __name__ == "__main__":
    main()
