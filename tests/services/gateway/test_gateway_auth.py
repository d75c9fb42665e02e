"""The gateway's HTTP security, in this process (no broker is needed to answer /v2/health/live): a bearer
token checked on every path before anything else, HTTPS with a certificate, and the checks of their options."""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.services.gateway.gateway_client import curl, self_signed_certificate
from zmserve_services.gateway.app import Gateway
from zmserve_services.gateway.auth import BearerToken, http_security, read_token
from zmserve_services.gateway.config import GatewayConfig

TOKEN = b"s3cret-token_with.printable~chars"


class RunningGateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.gateway = Gateway(config)
        self.port = int(self.gateway.address.rsplit(":", 1)[1])
        self.thread = threading.Thread(target=self.gateway.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.gateway.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


def wait_until_listening(connect) -> None:
    import time

    deadline = time.monotonic() + 10
    while True:
        connection = connect()
        try:
            connection.request("GET", "/v2/health/live", headers={"Authorization": f"Bearer {TOKEN.decode()}"})
            connection.getresponse().read()
            return
        except OSError:
            assert time.monotonic() < deadline, "the gateway did not answer"
            time.sleep(0.05)
        finally:
            connection.close()


@pytest.fixture
def with_token() -> Iterator[RunningGateway]:
    running = RunningGateway(GatewayConfig(bind="127.0.0.1:0", broker="tcp://127.0.0.1:1", auth_token=TOKEN))
    wait_until_listening(lambda: http.client.HTTPConnection("127.0.0.1", running.port, timeout=2))
    yield running
    running.stop()


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN.decode()}", "Bearer",
                                           f"Bearer {TOKEN.decode()}x", f"Bearer {TOKEN.decode()[:-1]}"])
def test_a_request_without_the_token_is_401_before_anything_else(with_token: RunningGateway,
                                                                 authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    for path in ("/v2/health/live", "/v2/models/matmul", "/nowhere"):
        status, response_headers, body = get(with_token.port, path, headers)
        assert status == 401 and response_headers["www-authenticate"] == 'Bearer realm="zmserve"'
        assert "Authorization: Bearer" in json.loads(body)["error"]
    status, _, body = get(with_token.port, "/model/matmul:predict", headers)  # MindSpore Serving's error field
    assert status == 401 and "error_msg" in json.loads(body)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_token_lets_a_request_through(with_token: RunningGateway, scheme: str) -> None:
    status, _, _ = get(with_token.port, "/v2/health/live", {"Authorization": f"{scheme} {TOKEN.decode()}"})
    assert status == 200


def test_curl_sends_the_token_like_any_client(with_token: RunningGateway) -> None:
    url = f"http://127.0.0.1:{with_token.port}"
    assert curl(url, "/v2/health/live", b"", "GET")[0] == 401
    assert curl(url, "/v2/health/live", b"", "GET", "-H", f"Authorization: Bearer {TOKEN.decode()}")[0] == 200


def test_the_token_is_compared_as_a_whole() -> None:
    token = BearerToken(TOKEN)
    assert token.allows([(b"authorization", b"Bearer " + TOKEN)])
    assert not token.allows([(b"authorization", b"Bearer " + TOKEN[:5])])
    assert not token.allows([(b"x-authorization", b"Bearer " + TOKEN)])
    assert not token.allows([])


def test_https_with_a_certificate(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    tls, _ = http_security("127.0.0.1:0", str(cert), str(key), None)
    running = RunningGateway(GatewayConfig(bind="127.0.0.1:0", broker="tcp://127.0.0.1:1", tls=tls))
    try:
        context = ssl.create_default_context(cafile=str(cert))
        wait_until_listening(lambda: http.client.HTTPSConnection("127.0.0.1", running.port, timeout=2,
                                                                 context=context))
        url = f"https://127.0.0.1:{running.port}"
        assert curl(url, "/v2/health/live", b"", "GET", "--cacert", str(cert))[0] == 200
        plain = http.client.HTTPConnection("127.0.0.1", running.port, timeout=5)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine)):
            plain.request("GET", "/v2/health/live")
            plain.getresponse()
        plain.close()
    finally:
        running.stop()


def test_option_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed_certificate(tmp_path)
    with pytest.raises(ValueError, match="--certfile and --keyfile go together"):
        http_security("127.0.0.1:1", str(cert), None, None)
    with pytest.raises(ValueError, match="--certfile"):
        http_security("127.0.0.1:1", str(key), str(key), None)  # a key is not a certificate
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token(tmp_path / "empty")
    (tmp_path / "spaced").write_text("two words\n")
    with pytest.raises(ValueError, match="printable ASCII without spaces"):
        read_token(tmp_path / "spaced")
    (tmp_path / "token").write_text(TOKEN.decode() + "\n")
    assert read_token(tmp_path / "token") == TOKEN

    import zmserve_services.gateway.auth

    monkeypatch.setattr(zmserve_services.gateway.auth, "log", structlog.get_logger("gateway"))
    with structlog.testing.capture_logs() as logs:
        http_security("0.0.0.0:1500", None, None, str(tmp_path / "token"))
        http_security("0.0.0.0:1500", str(cert), str(key), None)
        http_security("127.0.0.1:1500", None, None, None)
    assert [line["address"] for line in logs if line["event"] == "plaintext_on_network"] == ["0.0.0.0:1500"]
