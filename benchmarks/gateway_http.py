"""zmserve's HTTP gateway next to MindSpore Serving 2.0.2's REST server, same machine, same run, same load.

    .venv/bin/python -m benchmarks.gateway_http [--peer ../shared/peers/mindspore-serving] [--duration 10]
        [--clients 1,4,16] [--rounds 2] [--no-batched] [--skip-peer]

Both serve the MatMul (x 128x96 float32 · 0.5, negated; rank_size 1 for zmserve, no batch dimension on either
side) as servable `conform` (`rest_peer`); `zmserve_batched` is the same servable declared with_batch_dim=True
over the batch-dim export (the worker stacks concurrent requests, --max-batch-size 32, --max-batch-delay-ms 2),
with the same HTTP requests. All are up together; every point measures each server in turn with the same
client: C client processes (1, 4, 16), each one keep-alive `http.client` connection in a closed loop for
--duration seconds after 20 unrecorded requests, every answer checked (status 200, y 128x16, first and last
element -48). Bodies, as MindSpore Serving's own REST benchmark sends them: `json_list` (x as a nested JSON
number list, ~60 KB) and `b64` (x as {"b64", "type": "fp32", "shape"}, ~65 KB). zmserve alone also gets the
same tensor over the Open Inference Protocol (`oip_json`, `oip_binary`).

One JSON line per point (`row: gateway_http`: server, body, clients, req/s, p50/p99 ms, load1, and the CPU the
server's processes spent per request, in total and by process, children included: MindSpore Serving's worker
under its server; zmserve's broker, worker, agents and gateway; the client processes are not counted), then per
round,
zmserve server and body a `gateway_http_vs_peer` line: p50 at 1 client, throughput at the most clients, their
ratios and the issue's targets (JSON-list p50 <= 3 ms, b64 p50 <= 1.5 ms, >= 3x the peer's throughput at 16
clients).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from benchmarks.benchlib import cmdline, emit, export_matmul, wait_quiet
from benchmarks.peers.mindspore_serving.rest_peer import (
    RunningServer,
    mindspore_serving,
    peer_dir,
    zmserve_gateway,
)
from tests.services.gateway.ms_rest_cases import MINDSPORE_SERVING_CONFIG, SERVABLE, ZMSERVE_CONFIG

WARMUP = 20
X = np.ones((128, 96), np.float32)
EXPECTED = -48.0


def request_for(body_kind: str) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) for one body kind."""
    if body_kind == "json_list":
        return f"/model/{SERVABLE}:predict", json.dumps({"instances": [{"x": X.tolist()}]}).encode(), {}
    if body_kind == "b64":
        value = {"b64": base64.b64encode(X.tobytes()).decode(), "type": "fp32", "shape": [128, 96]}
        return f"/model/{SERVABLE}:predict", json.dumps({"instances": [{"x": value}]}).encode(), {}
    path = f"/v2/models/{SERVABLE}/infer"
    if body_kind == "oip_json":
        document = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [128, 96],
                                "data": X.reshape(-1).tolist()}], "parameters": {"method": "predict"}}
        return path, json.dumps(document).encode(), {}
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [128, 96],
                                   "parameters": {"binary_data_size": X.nbytes}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
                       "parameters": {"method": "predict"}}).encode()
    return path, head + X.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def check(body_kind: str, status: int, headers: http.client.HTTPMessage, data: bytes) -> None:
    if status != 200:
        raise RuntimeError(f"{body_kind}: HTTP {status}: {data[:300]!r}")
    if body_kind == "oip_binary":
        length = int(headers["Inference-Header-Content-Length"])
        y = np.frombuffer(data[length:], np.float32)
        ok = y.size == 128 * 16 and y[0] == EXPECTED and y[-1] == EXPECTED
    elif body_kind == "oip_json":
        y = orjson.loads(data)["outputs"][0]["data"]
        ok = len(y) == 128 * 16 and y[0] == EXPECTED and y[-1] == EXPECTED
    else:
        y = orjson.loads(data)["instances"][0]["y"]
        ok = len(y) == 128 and len(y[0]) == 16 and y[0][0] == EXPECTED and y[-1][-1] == EXPECTED
    if not ok:
        raise RuntimeError(f"{body_kind}: wrong answer {data[:200]!r}")


def client(url: str, body_kind: str, duration: float, ready: multiprocessing.Barrier, results) -> None:
    """One closed-loop client on one keep-alive connection: warm up, wait for the others, run, report."""
    host, port = url.removeprefix("http://").split(":")
    path, body, extra = request_for(body_kind)
    headers = {"Content-Type": "application/json", **extra}
    connection = http.client.HTTPConnection(host, int(port), timeout=60)

    def call() -> None:
        for attempt in range(2):  # MindSpore Serving's REST server drops a connection now and then
            try:
                connection.request("POST", path, body=body, headers=headers)
                response = connection.getresponse()
                check(body_kind, response.status, response.headers, response.read())
                return
            except (http.client.HTTPException, ConnectionError):
                connection.close()
                if attempt:
                    raise

    try:
        for _ in range(WARMUP):
            call()
        ready.wait()
        latencies = []
        end = time.perf_counter() + duration
        while (started := time.perf_counter()) < end:
            call()
            latencies.append(time.perf_counter() - started)
        results.put(latencies)
    except Exception as error:  # reported, not hung on
        results.put(repr(error))


def measure(url: str, body_kind: str, clients: int, duration: float) -> dict:
    context = multiprocessing.get_context("fork")
    ready = context.Barrier(clients)
    results = context.Queue()
    processes = [context.Process(target=client, args=(url, body_kind, duration, ready, results))
                 for _ in range(clients)]
    for process in processes:
        process.start()
    gathered = [results.get(timeout=duration + 300) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    failures = [g for g in gathered if isinstance(g, str)]
    if failures:
        raise RuntimeError(f"{len(failures)} clients failed: {failures[0]}")
    latencies = np.array([t for g in gathered for t in g]) * 1000
    return {"requests": int(latencies.size), "req_per_s": round(latencies.size / duration, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)), 3),
            "p99_ms": round(float(np.percentile(latencies, 99)), 3)}


def point(name: str, server: RunningServer, body_kind: str, clients: int, duration: float,
          round_index: int) -> dict:
    load = wait_quiet()
    cpu_before = server.cpu_seconds()
    result = measure(server.url, body_kind, clients, duration)
    cpu_after = server.cpu_seconds()
    per_process = {process: round((cpu_after[process] - cpu_before[process]) * 1000 / max(result["requests"], 1), 3)
                   for process in cpu_before}
    row = {"row": "gateway_http", "round": round_index, "server": name, "body": body_kind, "clients": clients,
           "load1": load, **result, "server_cpu_ms_per_request": round(sum(per_process.values()), 3),
           "cpu_ms_per_request_by_process": per_process, "command": cmdline()}
    emit(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", default="../shared/peers/mindspore-serving", help="relative to the repo root")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bodies", default="json_list,b64")
    parser.add_argument("--oip", default="oip_json,oip_binary", help="zmserve-only OIP bodies ('' = none)")
    parser.add_argument("--no-batched", action="store_true", help="skip the with_batch_dim zmserve")
    parser.add_argument("--skip-peer", action="store_true")
    args = parser.parse_args()
    clients_list = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="gateway_http_") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        servers = {"zmserve": stack.enter_context(zmserve_gateway(work / "zmserve", SERVABLE, ZMSERVE_CONFIG))}
        if not args.no_batched:
            batched = ZMSERVE_CONFIG.replace("with_batch_dim=False", "with_batch_dim=True")
            files = export_matmul(work / "batched_model", 1, batch_dim=True)
            servers["zmserve_batched"] = stack.enter_context(zmserve_gateway(
                work / "zmserve_batched", SERVABLE, batched, files,
                worker_args=("--max-batch-size", "32", "--max-batch-delay-ms", "2")))
        if not args.skip_peer:
            servers["mindspore_serving"] = stack.enter_context(mindspore_serving(
                peer_dir(args.peer), work / "peer", SERVABLE, MINDSPORE_SERVING_CONFIG))
        for round_index in range(args.rounds):
            for body_kind in args.bodies.split(","):
                rows = {(name, clients): point(name, server, body_kind, clients, args.duration, round_index)
                        for clients in clients_list for name, server in servers.items()}
                for server in servers:
                    if server != "mindspore_serving" and "mindspore_serving" in servers:
                        emit(compare(rows, server, body_kind, clients_list, round_index))
            for body_kind in [b for b in args.oip.split(",") if b]:
                for clients in clients_list:
                    for name, server in servers.items():
                        if name != "mindspore_serving":
                            point(name, server, body_kind, clients, args.duration, round_index)


def compare(rows: dict, server: str, body_kind: str, clients_list: list[int], round_index: int) -> dict:
    few, many = min(clients_list), max(clients_list)
    p50_target = {"json_list": 3.0, "b64": 1.5}.get(body_kind)
    zm_p50, peer_p50 = rows[server, few]["p50_ms"], rows["mindspore_serving", few]["p50_ms"]
    zm_rps, peer_rps = rows[server, many]["req_per_s"], rows["mindspore_serving", many]["req_per_s"]
    return {"row": "gateway_http_vs_peer", "round": round_index, "server": server, "body": body_kind,
            f"p50_ms_{few}_client": zm_p50, f"peer_p50_ms_{few}_client": peer_p50,
            "p50_peer_over_zmserve": round(peer_p50 / zm_p50, 2),
            f"req_per_s_{many}_clients": zm_rps, f"peer_req_per_s_{many}_clients": peer_rps,
            "throughput_over_peer": round(zm_rps / peer_rps, 2),
            "p50_target_ms": p50_target, "p50_target_met": p50_target is not None and zm_p50 <= p50_target,
            "throughput_target_met": zm_rps >= 3 * peer_rps, "command": cmdline()}


if __name__ == "__main__":
    main()
