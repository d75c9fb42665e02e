"""The status page's routes without processes: the page is self-contained, its data is the broker's STATUS as
JSON, and a broker that does not answer is a 503 the page can show."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from zmserve.protocol import ErrorCode, ServingError, Status
from zmserve_services.gateway import status_page
from zmserve_services.gateway.errors import HttpError


class FakeLink:
    address = "tcp://127.0.0.1:5500"

    def __init__(self, answer: Status | ServingError) -> None:
        self.answer = answer

    async def status(self, timeout: float) -> Status:
        if isinstance(self.answer, ServingError):
            raise self.answer
        return self.answer


def answer(link: FakeLink, path: str, verb: str = "GET") -> tuple[int, bytes, bytes]:
    return asyncio.run(status_page.answer(link, path, verb))  # type: ignore[arg-type]


def test_the_page_loads_nothing_from_elsewhere() -> None:
    status, body, content_type = answer(FakeLink(Status(id=1, uptime_s=1, in_flight=0)), "/")
    assert (status, content_type) == (200, b"text/html; charset=utf-8")
    page = body.decode()
    urls = set(re.findall(r"""(?:https?:)?//[^\s"'<>)]+""", page))
    assert urls == {"http://www.w3.org/2000/svg"}  # the SVG namespace, an identifier, never fetched
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    assert 'fetch("api/status"' in page


def test_the_data_is_the_brokers_status_with_its_address() -> None:
    status, body, _ = answer(FakeLink(Status(id=3, uptime_s=12.5, in_flight=2, lost=["old"])), "/api/status")
    document = json.loads(body)
    assert status == 200 and document["broker"] == "tcp://127.0.0.1:5500"
    assert (document["status"]["type"], document["status"]["uptime_s"], document["status"]["lost"]) == \
        ("status", 12.5, ["old"])


def test_no_broker_is_a_503_with_why() -> None:
    link = FakeLink(ServingError(ErrorCode.DEADLINE_EXCEEDED, "no reply from the broker within 2 s"))
    status, body, _ = answer(link, "/api/status")
    assert status == 503
    assert json.loads(body) == {"broker": "tcp://127.0.0.1:5500",
                                "error": "DEADLINE_EXCEEDED: no reply from the broker within 2 s"}


def test_only_get() -> None:
    with pytest.raises(HttpError) as refused:
        answer(FakeLink(Status(id=1, uptime_s=1, in_flight=0)), "/", "POST")
    assert refused.value.status == 405
