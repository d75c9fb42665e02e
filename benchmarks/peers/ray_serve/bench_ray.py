"""Row 6: Ray Serve serving the same MatMul MindIR (rank_size 1) on 127.0.0.1, @serve.batch on and off; closed-loop
throughput and p50/p99 at 1, 8 and 32 clients over Ray Serve's HTTP proxy (raw float32 bytes in and out, one
keep-alive http.client connection per client thread).

    .venv/bin/python -m benchmarks.peers.ray_serve.bench_ray [--duration 10] [--clients 1,8,32]

Ray lives in its own venv (benchmarks/peers/ray_serve/.venv: `pip install "ray[serve]" mindspore==2.10.0`), never
in zmserve's: run from zmserve's venv, this script exports the models there and re-executes itself with the Ray
venv's python. Ray starts with num_cpus=2 and no dashboard; serve.shutdown() and ray.shutdown() stop everything.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
RAY_PYTHON = HERE / ".venv" / "bin" / "python"
SHAPE = (128, 96)


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_quiet(max_wait: float = float(os.environ.get("BENCH_MAX_WAIT_S", "120"))) -> float:
    deadline = time.monotonic() + max_wait
    while load1() >= 1.0 and time.monotonic() < deadline:
        time.sleep(5)
    return load1()


def emit(row: dict) -> None:
    print(json.dumps({**row, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                      "cpus": os.cpu_count()}), flush=True)


def build_app(model_file: str, batched: bool, max_batch_size: int, batch_wait_s: float):
    """One deployment, one replica: GraphCell(ms.load(model_file)); with `batched` a @serve.batch method stacks
    concurrent requests into one [B,128,96] call of the --batch-dim export."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(num_replicas=1, max_ongoing_requests=128)
    class MatMul:
        def __init__(self) -> None:
            os.environ.setdefault("GLOG_v", "3")
            import mindspore as ms

            ms.set_context(mode=ms.GRAPH_MODE)
            ms.set_device("CPU")
            self.ms = ms
            self.cell = ms.nn.GraphCell(ms.load(model_file))

        def run(self, x: np.ndarray) -> np.ndarray:
            return self.cell(self.ms.Tensor(x)).asnumpy()

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def batch(self, xs: list[np.ndarray]) -> list[np.ndarray]:
            ys = self.run(np.stack(xs))
            return list(ys)

        async def __call__(self, request: Request) -> Response:
            x = np.frombuffer(await request.body(), np.float32).reshape(SHAPE)
            y = await self.batch(x) if batched else self.run(x)
            return Response(np.ascontiguousarray(y).tobytes(), media_type="application/octet-stream")

    return MatMul.bind()


def closed_loop(port: int, clients: int, duration: float) -> dict:
    """`clients` threads, each POSTing its next request when the previous answer is in; latency per request."""
    body = np.ones(SHAPE, np.float32).tobytes()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0]
    stop_at = time.monotonic() + duration

    def caller(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                conn.request("POST", "/", body=body, headers={"Content-Type": "application/octet-stream"})
                response = conn.getresponse()
                data = response.read()
                if response.status != 200 or len(data) != 128 * 16 * 4:
                    errors[0] += 1
                    continue
            except (OSError, http.client.HTTPException):
                errors[0] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            latencies[index].append(time.perf_counter() - started)
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    flat = np.array([v for values in latencies for v in values]) * 1000
    return {"requests": int(flat.size), "errors": errors[0], "req_per_s": round(flat.size / elapsed, 1),
            "p50_ms": round(float(np.percentile(flat, 50)), 3), "p99_ms": round(float(np.percentile(flat, 99)), 3)}


def measure(models: Path, duration: float, clients: list[int], command: str) -> None:
    import ray
    from ray import serve

    from_port = int(os.environ["RAY_SERVE_PORT"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": from_port})
        for mode, model in (("off", models / "plain" / "device0" / "matmul.mindir"),
                            ("on", models / "batched" / "device0" / "matmul.mindir")):
            serve.run(build_app(str(model), mode == "on", 32, 0.002), name=f"matmul_{mode}", route_prefix="/")
            warm = closed_loop(from_port, 1, 2.0)
            if warm["requests"] == 0:
                raise RuntimeError(f"ray serve answered nothing ({warm})")
            for count in clients:
                load = wait_quiet()
                result = closed_loop(from_port, count, duration)
                emit({"row": "ray_serve", "batching": mode, "clients": count, "api": "HTTP (proxy, raw bytes)",
                      "load1": load, **result, "ray": ray.__version__, "command": command})
            serve.delete(f"matmul_{mode}")
    finally:
        serve.shutdown()
        ray.shutdown()


def export_models(models: Path) -> None:
    """Rank-1 MatMul exports (plain and --batch-dim) made with zmserve's own export script."""
    script = REPO / "examples" / "matmul_distributed" / "export_model.py"
    for name, extra in (("plain", []), ("batched", ["--batch-dim"])):
        subprocess.run([sys.executable, str(script), "--rank-size", "1", "--output-dir", str(models / name),
                        "--rank-table", str(models / f"{name}.json"), *extra], check=True, capture_output=True,
                       env={**os.environ, "GLOG_v": "3"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--models", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--command", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    command = args.command or ".venv/bin/python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]])
    if args.models is None:
        if not RAY_PYTHON.exists():
            sys.exit(f"no Ray venv: python3.11 -m venv {HERE / '.venv'} && "
                     f"{HERE / '.venv/bin/pip'} install 'ray[serve]' mindspore==2.10.0")
        from zmserve.transport import free_port

        env = {**os.environ, "RAY_SERVE_PORT": os.environ.get("RAY_SERVE_PORT") or str(free_port())}
        with tempfile.TemporaryDirectory() as tmp:
            export_models(Path(tmp))
            done = subprocess.run([str(RAY_PYTHON), __file__, "--models", tmp, "--duration", str(args.duration),
                                   "--clients", args.clients, "--command", command], env=env)
        sys.exit(done.returncode)
    measure(args.models, args.duration, [int(c) for c in args.clients.split(",")], command)


if __name__ == "__main__":
    main()
