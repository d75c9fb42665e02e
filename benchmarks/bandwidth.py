"""Row 3: a big float32 tensor (64 MiB by default) through the service (Neg model, rank_size 1, dynamic shape) vs
the same bytes over a raw pyzmq REQ/REP round trip on loopback (echo server in another process), and vs the
Neg called in-process (`zmserve bench run --direct`) for the compute floor.

    .venv/bin/python -m benchmarks.bandwidth [--mib 64,16] [--requests 20] [--rounds 2]

MiB/s is request payload / round-trip time (the same bytes come back, as y = -x), so it is the rate each way.
The raw round trip is the best a two-hop-free ZeroMQ transfer can do here: zero-copy send, np.frombuffer on
receive, nothing else; the service makes 3 loopback TCP hops each way and runs the model.
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

from benchmarks.benchlib import bench, cluster, cmdline, emit, service_args, wait_quiet, write_servable
from benchmarks.export_identity import export
from zmserve.transport import free_port


def echo_server(address: str) -> None:
    """REP: send every message straight back, zero-copy both ways."""
    context = zmq.Context()
    socket = context.socket(zmq.REP)
    socket.bind(address)
    while True:
        frames = socket.recv_multipart(copy=False)
        if frames[0].bytes == b"stop":
            socket.send(b"bye")
            break
        socket.send_multipart(frames, copy=False)
    socket.close(0)
    context.term()


def raw_round_trips(array: np.ndarray, requests: int) -> dict:
    """`requests` REQ/REP round trips of `array` to an echo server in its own process; p50 and MiB/s."""
    address = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, "-m", __spec__.name, "--echo-server", address])
    context = zmq.Context()
    socket = context.socket(zmq.REQ)
    socket.connect(address)
    times = []
    try:
        for number in range(requests + 2):
            started = time.perf_counter()
            socket.send(array, copy=False)
            frame = socket.recv(copy=False)
            back = np.frombuffer(frame.buffer, dtype=array.dtype).reshape(array.shape)
            if number >= 2:
                times.append(time.perf_counter() - started)
            assert back.nbytes == array.nbytes
        socket.send(b"stop")
        socket.recv()
    finally:
        socket.close(0)
        context.term()
        server.wait(10)
    p50 = float(np.percentile(times, 50))
    return {"requests": requests, "p50_ms": round(p50 * 1000, 3),
            "MiB_per_s": round(array.nbytes / 2**20 / p50, 1)}


def shape_for(mib: int) -> tuple[int, int]:
    return (mib * 2**20 // 4 // 1024, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", default="64,16")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--echo-server", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server(args.echo_server)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = export(work / "model")
        servables = write_servable(work / "servables", "neg", 1)
        with cluster(work / "cluster", servables, "neg", [model], {"x": np.ones((2, 3), np.float32)}) as local:
            for round_number in range(args.rounds):
                for mib in (int(m) for m in args.mib.split(",")):
                    rows, cols = shape_for(mib)
                    common = ["--shape", f"{rows}x{cols}", "--requests", str(args.requests), "--warmup", "2",
                              "--timeout", "60"]
                    load = wait_quiet()
                    raw = raw_round_trips(np.ones((rows, cols), np.float32), args.requests)
                    emit({"row": "bandwidth_raw_zmq", "MiB": mib, "round": round_number, "load1": load, **raw})
                    load = wait_quiet()
                    direct = bench(["--direct", "--model-files", str(model), *common])
                    emit({"row": "bandwidth_direct_neg", "MiB": mib, "round": round_number, "load1": load,
                          "p50_ms": direct["p50_ms"], "MiB_per_s": round(mib / direct["p50_ms"] * 1000, 1)})
                    load = wait_quiet()
                    service = bench([*service_args(local), "-c", "1", *common])
                    service_rate = round(mib / service["p50_ms"] * 1000, 1)
                    emit({"row": "bandwidth_service", "MiB": mib, "round": round_number, "load1": load,
                          "p50_ms": service["p50_ms"], "p99_ms": service["p99_ms"], "ok": service["ok"],
                          "MiB_per_s": service_rate, "service_over_raw": round(service_rate / raw["MiB_per_s"], 2),
                          "command": cmdline()})


if __name__ == "__main__":
    main()
