"""Failures as HTTP statuses: zmserve's error codes (whose fault, what to do) become the status a client, a proxy
or a load balancer acts on; the body that carries the message is each scheme's own (`ms_rest`, `oip`)."""

from __future__ import annotations

from zmserve.protocol import ErrorCode

HTTP_STATUS: dict[str, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,  # the request is wrong: do not retry it as it is
    ErrorCode.NOT_FOUND: 404,  # no such servable, version or method
    ErrorCode.RESOURCE_EXHAUSTED: 429,  # too much work queued: back off, then retry
    ErrorCode.UNAVAILABLE: 503,  # the servable exists but cannot answer now (starting, restarting its agents)
    ErrorCode.DEADLINE_EXCEEDED: 504,  # no answer within the request's deadline
    ErrorCode.INTERNAL: 500,  # a bug or a failure inside the servable or the model
    ErrorCode.CANCELLED: 499,  # the caller gave up (nginx's "client closed request"; nobody reads it)
    ErrorCode.UNAUTHENTICATED: 502,  # the broker refused the gateway's own CURVE keys: the gateway is misconfigured
}


def http_status(code: str) -> int:
    """The status for a zmserve error code; an unknown code is the server's fault (500)."""
    return HTTP_STATUS.get(code, 500)


class HttpError(Exception):
    """A failure of the HTTP exchange itself, found before any broker request: a wrong method, a body too large
    or too slow. `close` asks for the connection to be closed after the answer (the rest of the body is not
    worth reading)."""

    def __init__(self, status: int, message: str, close: bool = False, allow: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.close = close
        self.allow = allow
