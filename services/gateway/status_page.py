"""The live status page: `GET /` is one static HTML file (status_page.html: vanilla JS and SVG, nothing fetched
from elsewhere), which asks `GET /api/status` every second; that endpoint asks the broker (STATUS_QUERY, the
same answer `zmserve status --json` prints) and returns it as JSON with the broker's address.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from zmserve.protocol import ServingError
from zmserve_services.gateway.broker_link import BrokerLink
from zmserve_services.gateway.errors import HttpError

PAGE_PATH = "/"
API_PATH = "/api/status"
PATHS = (PAGE_PATH, API_PATH)
STATUS_TIMEOUT_S = 2.0
"""How long the JSON endpoint waits for the broker before answering 503."""
PAGE = (Path(__file__).parent / "status_page.html").read_bytes()
HTML = b"text/html; charset=utf-8"


async def answer(link: BrokerLink, path: str, verb: str) -> tuple[int, bytes, bytes]:
    """(HTTP status, body, content type) for the page or its data."""
    if verb != "GET":
        raise HttpError(405, f"{verb} is not allowed here; use GET", allow="GET")
    if path == PAGE_PATH:
        return 200, PAGE, HTML
    try:
        status = await link.status(STATUS_TIMEOUT_S)
    except ServingError as error:
        return 503, msgspec.json.encode({"broker": link.address, "error": f"{error.code}: {error.message}"}), \
            b"application/json"
    return 200, msgspec.json.encode({"broker": link.address, "status": status}), b"application/json"
