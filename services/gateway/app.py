"""`zmserve gateway`: HTTP in, broker requests out. One process, one asyncio loop (uvloop), an ASGI app on uvicorn
(httptools parser), and one BrokerLink that every request shares.

    POST /model/{servable}[/version/{n}]:{method}        MindSpore Serving's RESTful scheme   (ms_rest)
    GET  /v2                                             OIP server metadata                  (oip)
    GET  /v2/health/live, /v2/health/ready               OIP health
    GET  /v2/models/{name}[/versions/{v}]                OIP model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready          OIP model ready
    POST /v2/models/{name}[/versions/{v}]/infer          OIP infer (JSON or binary tensors)
    POST /v1/completions, /v1/chat/completions           OpenAI's text generation, SSE streams (openai_api)
    GET  /v1/models                                      OpenAI's model list
    GET  /, /api/status                                  the live status page and its data   (status_page)

With `--grpc-bind`, the same process and loop also answer gRPC (grpc_server: MindSpore Serving's MSService and the
OIP's GRPCInferenceService), sharing the one BrokerLink; without `--bind` (`bind=None`) it answers gRPC only.

Why a bare ASGI app on uvicorn: measured with `benchmarks/gateway_frameworks.py`, it answers a 65 KB b64 body
in 0.26-0.29 ms p50 against 0.33-0.36 ms for aiohttp (on uvloop) and 0.40-0.43 ms for Starlette on the same
uvicorn; with two route families, a router adds nothing the path checks below do not.

Each request is its own task, so a slow or half-sent body holds only its own connection: it waits in
`read_body`, bounded by `--body-timeout` (then 408 and the connection is closed), and the loop keeps serving
everyone else. Keep-alive is uvicorn's (HTTP/1.1 default, closed after `--keep-alive-timeout` idle seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import parse_qs

import uvicorn
import uvloop

from zmserve.codec import Instance
from zmserve.logs import get_logger
from zmserve.protocol import ServingError
from zmserve_services.gateway import ms_rest, oip, openai_api, status_page
from zmserve_services.gateway.auth import BearerToken, client_address
from zmserve_services.gateway.broker_link import BrokerLink, Served
from zmserve_services.gateway.config import GRACEFUL_SHUTDOWN_S, METADATA_TTL_S, GatewayConfig
from zmserve_services.gateway.errors import HttpError, http_status

log = get_logger("gateway")

OIP_MODEL = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?$")
METADATA_TIMEOUT_S = 2.0
"""How long a health, ready or metadata answer waits for the broker."""
JSON = b"application/json"
OCTET_STREAM = b"application/octet-stream"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Response(NamedTuple):
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


class ClientGone(Exception):
    """The client closed its connection before its body arrived: nobody to answer."""


CLIENT_CLOSED_REQUEST = 499
"""The status counted (never sent) for a caller that hung up before its answer, as nginx logs it."""


class HangUpWatch:
    """Whether the HTTP caller hangs up while its request is computed. Once the body is read, a task waits for
    uvicorn's `http.disconnect`; if it comes before the answer, the request's task is cancelled, and with it its
    broker requests (BrokerLink sends CANCEL, so the worker drops what has not reached the agents)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.request_task = asyncio.current_task()
        self.watcher: asyncio.Task | None = None
        self.hung_up = False

    async def receive(self) -> dict[str, Any]:
        """The handlers' `receive`: starts watching once the last body chunk is handed over."""
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False) and self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self.watch())
        return message

    async def watch(self) -> None:
        # uvicorn may hand over one more, empty `http.request` first (its body event set twice by a body that came
        # in two reads): only `http.disconnect` means the caller hung up
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if self.request_task is not None:
            self.hung_up = True
            self.request_task.cancel()

    def stop(self) -> None:
        """The answer is ready: from now on a disconnect is uvicorn's business, not a cancel."""
        if self.watcher is not None:
            self.watcher.cancel()


class GatewayApp:
    """The ASGI application: routes a request to its scheme, which answers it through the broker link."""

    def __init__(self, link: BrokerLink, config: GatewayConfig) -> None:
        self.link = link
        self.config = config
        self.metrics = link.metrics
        self.default_methods: dict[tuple[str, int], tuple[float, str]] = {}
        """(servable, version) -> (when the broker said so, its first method); only answers that exist."""
        self.token = BearerToken(config.auth_token) if config.auth_token is not None else None
        self.openai_api = openai_api.OpenAIApi(link, config.request_timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        started = time.perf_counter()
        route = route_of(path)
        if self.token is not None and not self.token.allows(scope["headers"]):
            response = unauthorized(scope)
            await respond(send, response)
            self.metrics.http_request(route, response.status, started, len(response.body))
            return
        caller = HangUpWatch(receive)
        try:
            try:
                if route == "ms_rest":
                    response = await self.ms_rest(scope, caller.receive)
                elif route == "oip":
                    response = await self.oip(scope, caller.receive)
                elif route == "status":
                    response = await self.status(scope)
                elif route == "openai":
                    answer = await self.openai_api.handle(scope, lambda: self.read_body(scope, caller.receive),
                                                          send)
                    if answer is None:  # streamed: sent as it came
                        self.metrics.http_request(route, 200, started, 0)
                        return
                    response = Response(*answer)
                else:
                    response = Response(404, oip.error_body(
                        f"no route for {path}: this gateway answers /model/{{servable}}[/version/{{n}}]:{{method}} "
                        "(MindSpore Serving), /v2/... (Open Inference Protocol), /v1/... (OpenAI's completions) "
                        "and / (the status page)"))
            finally:
                caller.stop()
        except ClientGone:
            return
        except asyncio.CancelledError:
            if not caller.hung_up:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            log.info("request_abandoned", path=path, why="the HTTP client disconnected before its answer")
            self.metrics.http_request(route, CLIENT_CLOSED_REQUEST, started, 0)
            return
        except Exception as exc:  # a bug: answer it, never leave the client waiting
            log.exception("request_crashed", path=path)
            response = Response(500, oip.error_body(f"{type(exc).__name__}: {exc}"))
        await respond(send, response)
        self.metrics.http_request(route, response.status, started, len(response.body))

    # ---- the status page ------------------------------------------------------------------------------------
    async def status(self, scope: Scope) -> Response:
        try:
            status, body, content_type = await status_page.answer(self.link, scope["path"], scope["method"])
        except HttpError as error:
            return http_failed(scope, error, oip.error_body(error.message))
        return Response(status, body, content_type)

    # ---- MindSpore Serving ----------------------------------------------------------------------------------
    async def ms_rest(self, scope: Scope, receive: Receive) -> Response:
        try:
            if scope["method"] != "POST":
                raise HttpError(405, "http message only support POST right now", allow="POST")
            target = ms_rest.parse_path(scope["path"])
            instances = ms_rest.parse_body(await self.read_body(scope, receive))
            if len(instances) == 1:
                outcomes = [await self.infer_one(target, instances[0])]
            else:
                outcomes = list(await asyncio.gather(*(self.infer_one(target, i) for i in instances)))
            status, body = ms_rest.reply(outcomes)
            if status != 200:
                log_failure(scope, status, next(o for o in outcomes if isinstance(o, ServingError)))
            return Response(status, body)
        except ServingError as error:
            return failed(scope, error, ms_rest.error_body(error.message))
        except HttpError as error:
            return http_failed(scope, error, ms_rest.error_body(error.message))

    async def infer_one(self, target: ms_rest.Target, instance: Instance) -> Instance | ServingError:
        try:
            outputs = await self.link.infer(target.servable, target.method, target.version, [instance],
                                            self.config.request_timeout)
        except ServingError as error:
            return error
        return outputs[0]

    # ---- Open Inference Protocol ----------------------------------------------------------------------------
    async def oip(self, scope: Scope, receive: Receive) -> Response:
        try:
            return await self.oip_route(scope, receive)
        except ServingError as error:
            return failed(scope, error, oip.error_body(error.message))
        except HttpError as error:
            return http_failed(scope, error, oip.error_body(error.message))

    async def oip_route(self, scope: Scope, receive: Receive) -> Response:
        path, verb = scope["path"], scope["method"]
        query = parse_qs(scope["query_string"].decode())
        method = query[oip.METHOD_PARAMETER][0] if oip.METHOD_PARAMETER in query else None
        if path in ("/v2", "/v2/"):
            expect(verb, "GET")
            return Response(200, oip.server_metadata())
        if path == "/v2/health/live":
            expect(verb, "GET")
            return Response(200, b"")
        if path == "/v2/health/ready":
            expect(verb, "GET")
            return await self.server_ready()
        match = OIP_MODEL.match(path)
        if match is None:
            raise HttpError(404, f"no route for {path}")
        name, version, action = match["name"], oip.parse_version(match["version"]), match["action"]
        if action is None:
            expect(verb, "GET")
            return Response(200, oip.model_metadata(await self.served(name), name, version, method))
        if action == "/ready":
            expect(verb, "GET")
            chosen = oip.choose(await self.served(name), name, version)
            if not chosen.ready:
                return Response(400, oip.error_body(f"servable {name!r} is not ready: {chosen.reason}"))
            return Response(200, b"")
        expect(verb, "POST")
        return await self.oip_infer(scope, receive, name, version, method)

    async def oip_infer(self, scope: Scope, receive: Receive, name: str, version: int,
                        query_method: str | None) -> Response:
        request = oip.parse_infer(await self.read_body(scope, receive), header(scope, oip.HEADER_LENGTH))
        method = request.method or query_method or await self.default_method(name, version)
        outputs = await self.link.infer(name, method, version, [request.inputs],
                                        request.timeout or self.config.request_timeout)
        body, json_length = oip.infer_response(name, version, request, outputs[0])
        if json_length is None:
            return Response(200, body)
        return Response(200, body, OCTET_STREAM, ((oip.HEADER_LENGTH.encode(), str(json_length).encode()),))

    async def server_ready(self) -> Response:
        """Ready when the broker answers and serves at least one servable version that is ready."""
        served = await self.link.served(None, METADATA_TIMEOUT_S)
        if not any(v.ready for v in served.versions):
            return Response(400, oip.error_body(
                "no servable is ready: " + ("; ".join(f"{v.servable} v{v.version}: {v.reason}"
                                                      for v in served.versions) or "none is registered")))
        return Response(200, b"")

    async def served(self, name: str | None) -> Served:
        return await self.link.served(name, METADATA_TIMEOUT_S)

    async def default_method(self, name: str, version: int) -> str:
        """The servable's first method, as the broker said at most METADATA_TTL_S ago (an infer that names no
        method must not cost a second round trip each time); a servable not known yet is asked about at once."""
        cached = self.default_methods.get((name, version))
        if cached is not None and time.monotonic() - cached[0] <= METADATA_TTL_S:
            return cached[1]
        method = oip.choose_method(oip.choose(await self.served(name), name, version), None)
        self.default_methods[name, version] = (time.monotonic(), method)
        return method

    # ---- the body -------------------------------------------------------------------------------------------
    async def read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, at most `max_body_bytes` (413), complete within `body_timeout` (408)."""
        limit = self.config.max_body_bytes
        declared = header(scope, "content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HttpError(413, f"the body has {declared} bytes; this gateway takes at most {limit}", close=True)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.config.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise HttpError(413, f"the body is larger than this gateway's {limit} bytes", close=True)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise HttpError(408, f"the request body was not complete within {self.config.body_timeout:g} s",
                            close=True) from None
        self.metrics.received(size)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def route_of(path: str) -> str:
    """The `route` label of the gateway's HTTP metrics."""
    if path.startswith(ms_rest.PREFIX):
        return "ms_rest"
    if path == "/v2" or path.startswith("/v2/"):
        return "oip"
    if path in status_page.PATHS:
        return "status"
    if path.startswith(openai_api.PREFIX):
        return "openai"
    return "other"


def unauthorized(scope: Scope) -> Response:
    """401 before the body is read: the request did not carry the gateway's bearer token."""
    message = "this gateway needs 'Authorization: Bearer <token>' (its --auth-token-file)"
    log.info("request_failed", path=scope["path"], status=401, message=message, peer=client_address(scope))
    body = ms_rest.error_body(message) if scope["path"].startswith(ms_rest.PREFIX) else oip.error_body(message)
    return Response(401, body, JSON, ((b"www-authenticate", b'Bearer realm="zmserve"'), (b"connection", b"close")))


def expect(verb: str, allowed: str) -> None:
    if verb != allowed:
        raise HttpError(405, f"{verb} is not allowed here; use {allowed}", allow=allowed)


def header(scope: Scope, name: str) -> str | None:
    wanted = name.encode()
    for key, value in scope["headers"]:
        if key == wanted:
            return value.decode("latin-1")
    return None


def log_failure(scope: Scope, status: int, error: ServingError) -> None:
    log.info("request_failed", path=scope["path"], status=status, code=error.code, message=error.message)


def failed(scope: Scope, error: ServingError, body: bytes) -> Response:
    status = http_status(error.code)
    log_failure(scope, status, error)
    return Response(status, body)


def http_failed(scope: Scope, error: HttpError, body: bytes) -> Response:
    log.info("request_failed", path=scope["path"], status=error.status, message=error.message)
    headers = []
    if error.close:
        headers.append((b"connection", b"close"))
    if error.allow:
        headers.append((b"allow", error.allow.encode()))
    return Response(error.status, body, JSON, tuple(headers))


async def respond(send: Send, response: Response) -> None:
    await send({"type": "http.response.start", "status": response.status,
                "headers": [(b"content-type", response.content_type),
                            (b"content-length", str(len(response.body)).encode()), *response.headers]})
    await send({"type": "http.response.body", "body": response.body})


class _UvicornLog(logging.Handler):
    """uvicorn's own log records (e.g. an unparseable request) as structlog lines like every other zmserve line."""

    def emit(self, record: logging.LogRecord) -> None:
        log.log(record.levelno, "http_server", message=record.getMessage())


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `zmserve.cli.run_until_signalled` owns SIGINT/SIGTERM and calls
    `Gateway.stop`, as for every other zmserve service."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


class Gateway:
    """The service `zmserve gateway` runs: binds at construction (so a taken port fails the command at once, and
    port 0 picks a free one), serves in `run` until `stop`."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.listener: socket.socket | None = None
        self.address: str | None = None
        if config.bind is not None:
            host, port = config.host_port
            self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.listener.bind((host, port))
            except OSError:
                self.listener.close()
                raise
            self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.grpc_address: str | None = None
        """Where gRPC listens once `serve` has started it (`--grpc-bind` with port 0 picks a free one)."""
        self.server: _Server | None = None
        self.stopped = asyncio.Event()
        """Set by `stop` for a gRPC-only gateway (no uvicorn to tell)."""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_requested = False

    def run(self) -> None:
        uvloop.run(self.serve())

    def stop(self) -> None:
        self.stop_requested = True
        if self.server is not None:
            self.server.should_exit = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.stopped.set)

    def drain(self) -> None:
        """As `stop` (SIGTERM and SIGINT stopped the gateway alike before the one lifecycle, and still do)."""
        self.stop()

    async def serve(self) -> None:
        uvicorn_log = logging.getLogger("uvicorn")
        uvicorn_log.addHandler(_UvicornLog())
        uvicorn_log.propagate = False
        self.loop = asyncio.get_running_loop()
        link = BrokerLink(self.config.broker, metrics=self.config.metrics, curve=self.config.broker_curve)
        await link.start()
        grpc_server = None
        try:
            if self.config.grpc_bind is not None:
                from zmserve_services.gateway.grpc_server import start_grpc

                grpc_server, self.grpc_address = await start_grpc(link, self.config)
            tls = self.config.tls
            log.info("gateway_started", bind=self.address, grpc=self.grpc_address, broker=link.address,
                     https=tls is not None, token=self.config.auth_token is not None,
                     curve=self.config.broker_curve is not None)
            if self.listener is None:
                if not self.stop_requested:
                    await self.stopped.wait()
            else:
                self.server = _Server(uvicorn.Config(
                    GatewayApp(link, self.config), http="httptools", ws="none", lifespan="off", interface="asgi3",
                    log_config=None, log_level="warning", access_log=False, server_header=False,
                    proxy_headers=False, timeout_keep_alive=self.config.keep_alive_timeout,
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                    ssl_certfile=tls.certfile if tls else None, ssl_keyfile=tls.keyfile if tls else None))
                self.server.should_exit = self.stop_requested
                await self.server.serve(sockets=[self.listener])
        finally:
            if grpc_server is not None:  # calls in flight get the same grace as HTTP requests
                await grpc_server.stop(GRACEFUL_SHUTDOWN_S)
            await link.close()
            if self.listener is not None:
                self.listener.close()
            log.info("gateway_stopped")

