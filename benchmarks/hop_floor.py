"""The floor of zmserve's one-machine topology: a client's round trip through N Python forwarders to an echo, with
no zmserve code at all (each forwarder: ROUTER in, DEALER out, drain and forward in a poll loop, one process).
`zmserve serve` + an agent is one forwarder (the serve process) and an echo that also runs the model, so its
latency over the direct model call cannot go below the 1-forwarder round trip measured here, now.

    .venv/bin/python -m benchmarks.hop_floor [--forwarders 0,1,2] [--requests 3000]

The client link is loopback TCP (as a client's), the links behind the first forwarder ipc:// (as zmserve's data
links on loopback). The same logic as ../shared/bin/hop-costs.py, on free endpoints, with its processes reaped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid

import numpy as np
import zmq

from zmserve.transport import free_port


def echo(address: str) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(address)
    while True:
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


def forward(front: str, back: str) -> None:
    context = zmq.Context.instance()
    clients, server = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    clients.bind(front)
    server.connect(back)
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(server, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            other = server if sock is clients else clients
            while sock.poll(0):
                other.send_multipart(sock.recv_multipart(copy=False), copy=False)


def forwarder_round_trip(forwarders: int, payload: int, requests: int = 3000, warmup: int = 200) -> dict:
    """p50/p99 ms of `requests` round trips of a `payload`-byte frame through `forwarders` forwarder processes."""
    name = uuid.uuid4().hex[:12]
    addresses = [f"tcp://127.0.0.1:{free_port()}"] + [f"ipc://@zmserve-floor-{name}-{i}" for i in range(forwarders)]
    roles = [["echo", addresses[-1]]] + [["forward", addresses[i], addresses[i + 1]] for i in range(forwarders)]
    processes = [subprocess.Popen([sys.executable, "-m", __spec__.name, "--role", *role]) for role in roles]
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(addresses[0])
    data = np.ones(payload // 4, np.float32)
    times = []
    try:
        for number in range(requests + warmup):
            started = time.perf_counter()
            sock.send_multipart([b"", data], copy=False)
            if not sock.poll(10_000):
                raise RuntimeError("the echo did not answer within 10 s")
            sock.recv_multipart(copy=False)
            if number >= warmup:
                times.append(time.perf_counter() - started)
    finally:
        sock.close(0)
        context.term()
        for process in processes:
            process.kill()
            process.wait()
    return {"forwarders": forwarders, "payload_bytes": payload, "requests": requests,
            "p50_ms": round(float(np.percentile(times, 50)) * 1000, 4),
            "p99_ms": round(float(np.percentile(times, 99)) * 1000, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forwarders", default="0,1,2")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--payload", type=int, default=128 * 96 * 4)
    parser.add_argument("--role", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        echo(args.role[1]) if args.role[0] == "echo" else forward(args.role[1], args.role[2])
        return
    for count in (int(n) for n in args.forwarders.split(",")):
        print(json.dumps(forwarder_round_trip(count, args.payload, args.requests)), flush=True)


if __name__ == "__main__":
    main()
