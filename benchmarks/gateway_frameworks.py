"""Which async HTTP server should the gateway stand on? The same trivial handler on each candidate, measured.

    .venv/bin/pip install aiohttp starlette   # the candidates the gateway did not take
    .venv/bin/python -m benchmarks.gateway_frameworks [--requests 3000] [--rounds 2]

Each candidate runs in its own process on a free loopback port and answers `POST /echo` by parsing the JSON body
(orjson, or the stdlib json for the `+json` rows) and replying with a 2 KiB JSON document, the shape of the
gateway's work without the broker. The client is one keep-alive `http.client` connection in this process (closed
loop), sending the 128x96 float32 MatMul input as a JSON list (the body MindSpore Serving's REST benchmark sends,
~60 KB) and as a b64 tensor (~65 KB of base64 in a small JSON). Prints one JSON line per (candidate, body) with
p50/p99 and the load average.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import subprocess
import sys
import time

import numpy as np

from benchmarks.benchlib import cmdline, emit, load1
from zmserve.local import free_port
from zmserve.supervision import reap

SERVERS = {
    "aiohttp": """
import asyncio, sys, orjson
from aiohttp import web
REPLY = orjson.dumps({"instances": [{"y": [[-48.0] * 16] * 128}]})
async def echo(request):
    body = orjson.loads(await request.read())
    return web.Response(body=REPLY, content_type="application/json")
app = web.Application(client_max_size=64 << 20)
app.router.add_post("/echo", echo)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
""",
    "aiohttp+uvloop": """
import sys, orjson, uvloop
from aiohttp import web
REPLY = orjson.dumps({"instances": [{"y": [[-48.0] * 16] * 128}]})
async def echo(request):
    body = orjson.loads(await request.read())
    return web.Response(body=REPLY, content_type="application/json")
app = web.Application(client_max_size=64 << 20)
app.router.add_post("/echo", echo)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, loop=uvloop.new_event_loop())
""",
    "starlette+uvicorn": """
import sys, orjson, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
REPLY = orjson.dumps({"instances": [{"y": [[-48.0] * 16] * 128}]})
async def echo(request):
    body = orjson.loads(await request.body())
    return Response(REPLY, media_type="application/json")
app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
            loop="uvloop", http="httptools")
""",
    "asgi+uvicorn": """
import sys, orjson, uvicorn
REPLY = orjson.dumps({"instances": [{"y": [[-48.0] * 16] * 128}]})
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = orjson.loads(b"".join(chunks))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(REPLY)).encode())]})
    await send({"type": "http.response.body", "body": REPLY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
            loop="uvloop", http="httptools", lifespan="off")
""",
}
SERVERS["aiohttp+json"] = SERVERS["aiohttp"].replace("orjson.loads", "json.loads").replace("import asyncio,",
                                                                                               "import json, asyncio,")


def bodies() -> dict[str, bytes]:
    x = np.ones((128, 96), np.float32)
    b64 = {"b64": base64.b64encode(x.tobytes()).decode(), "type": "fp32", "shape": [128, 96]}
    return {"json_list": json.dumps({"instances": [{"x": x.tolist()}]}).encode(),
            "b64": json.dumps({"instances": [{"x": b64}]}).encode()}


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen")


def measure(port: int, body: bytes, requests: int) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    times = []
    for i in range(requests + 100):
        started = time.perf_counter()
        connection.request("POST", "/echo", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
        if i >= 100:
            times.append(time.perf_counter() - started)
    connection.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default=",".join(SERVERS))
    args = parser.parse_args()
    for round_index in range(args.rounds):
        for name in args.only.split(","):
            port = free_port()
            process = subprocess.Popen([sys.executable, "-c", SERVERS[name], str(port)])
            try:
                wait_listening(port, process)
                for kind, body in bodies().items():
                    load = load1()
                    times = np.array(measure(port, body, args.requests)) * 1000
                    emit({"row": "http_framework", "server": name, "body": kind, "round": round_index,
                          "p50_ms": round(float(np.percentile(times, 50)), 4),
                          "p99_ms": round(float(np.percentile(times, 99)), 4), "load1": load,
                          "command": cmdline()})
            finally:
                reap(process)


if __name__ == "__main__":
    main()
