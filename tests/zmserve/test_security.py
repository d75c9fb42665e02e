"""CURVE keys and refusals without any zmserve process: key files, the options' checks, and the Python client
against a ROUTER that plays a CURVE broker (pyzmq's authenticator admitting one folder of keys). Every refusal
must end the call at once with UNAUTHENTICATED (not at its deadline) and be logged on the server side with the
peer's address; a key added to the folder is admitted after a reload."""

from __future__ import annotations

import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import structlog
import zmq
from click.testing import CliRunner

from zmserve.cli import main
from zmserve.client import Client, ClientError
from zmserve.codec import encode_instances
from zmserve.protocol import ErrorCode, Reply, Request, decode, encode
from zmserve.security import (
    PLAINTEXT,
    Domain,
    Handshake,
    KeyPair,
    Peer,
    Refusal,
    Security,
    SecurityError,
    Throttle,
    generate_key_pair,
    is_local_address,
    reload_allowed_keys,
)
from zmserve.transport import bind, new_socket

ONES = {"x": np.ones((2, 3), np.float32)}
DEADLINE_S = 10.0
"""Long on purpose: a refusal must come back far sooner than this."""


def wait_for(condition, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


class Logs:
    """What zmserve/security/ logs (from any thread) while the test runs."""

    def __init__(self, lines: list[dict]) -> None:
        self.lines = lines

    def events(self, event: str) -> list[dict]:
        return [line for line in list(self.lines) if line["event"] == event]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Logs]:
    from zmserve.security import handshake, policy, zap

    # each module's logger is bound at import; an unbound one follows capture_logs' configuration
    for module in (zap, handshake, policy):
        monkeypatch.setattr(module, "log", structlog.get_logger("security"))
    with structlog.testing.capture_logs() as lines:
        yield Logs(lines)


# ---- keys and options ---------------------------------------------------------------------------------------
def test_generated_key_pair_is_zeromq_certificates_and_the_secret_is_private(tmp_path: Path) -> None:
    public, secret = generate_key_pair(tmp_path / "keys", "broker")
    assert (public.name, secret.name) == ("broker.key", "broker.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    keys = KeyPair.load(secret)
    assert zmq.auth.load_certificate(public) == (keys.public, None)
    assert zmq.curve_public(keys.secret) == keys.public


def test_a_key_pair_is_never_overwritten(tmp_path: Path) -> None:
    generate_key_pair(tmp_path, "worker")
    before = (tmp_path / "worker.key_secret").read_bytes()
    with pytest.raises(SecurityError, match="never overwritten"):
        generate_key_pair(tmp_path, "worker")
    assert (tmp_path / "worker.key_secret").read_bytes() == before


def test_keys_generate_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keys", "generate", str(tmp_path / "k"), "--name", "host-a"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k" / "host-a.key").is_file() and (tmp_path / "k" / "host-a.key_secret").is_file()
    again = CliRunner().invoke(main, ["keys", "generate", str(tmp_path / "k"), "--name", "host-a"])
    assert again.exit_code != 0 and "never overwritten" in again.output


def test_the_public_file_is_not_a_key_pair(tmp_path: Path) -> None:
    public, _ = generate_key_pair(tmp_path, "client")
    with pytest.raises(SecurityError, match="holds no secret key"):
        KeyPair.load(public)
    with pytest.raises(SecurityError, match="cannot read the key file"):
        KeyPair.load(tmp_path / "missing.key_secret")


def test_keys_need_a_secret_key_and_folders_need_keys(tmp_path: Path) -> None:
    _, secret = generate_key_pair(tmp_path, "broker")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SecurityError, match="--client-keys, --broker-key need --secret-key"):
        Security.load(None, {Domain.CLIENTS: tmp_path}, {Peer.BROKER: tmp_path / "broker.key"})
    with pytest.raises(SecurityError, match=r"holds no \.key file"):
        Security.load(secret, {Domain.CLIENTS: tmp_path / "empty"})
    with pytest.raises(SecurityError, match="does not exist"):
        Security.load(secret, {Domain.CLIENTS: tmp_path / "nowhere"})


def test_require_curve_names_every_missing_option(tmp_path: Path) -> None:
    _, secret = generate_key_pair(tmp_path, "worker")
    with pytest.raises(SecurityError, match=r"--require-curve: --secret-key, --agent-keys, --broker-key not given"):
        PLAINTEXT.require([Domain.AGENTS], [Peer.BROKER])
    partial = Security.load(secret, {}, {Peer.BROKER: tmp_path / "worker.key"})
    with pytest.raises(SecurityError, match=r"--require-curve: --agent-keys not given"):
        partial.require([Domain.AGENTS], [Peer.BROKER])
    assert partial.client(Peer.BROKER) is not None and partial.server(Domain.AGENTS) is None


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:5500", True), ("tcp://127.0.0.1:5500", True), ("localhost:1", True), ("tcp://[::1]:5", True),
    ("ipc:///tmp/x", True), ("127.0.0.2:9", True), ("0.0.0.0:5500", False), ("tcp://*:5500", False),
    ("10.0.0.1:6200", False), ("tcp://example.org:5500", False), ("[2001:db8::1]:5", False),
])
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_local_address(address) is loopback


def test_a_plaintext_bind_on_the_network_is_warned_about_and_loopback_is_not(logs: Logs) -> None:
    PLAINTEXT.warn_plaintext({Domain.CLIENTS: "tcp://0.0.0.0:5500", Domain.WORKERS: "tcp://127.0.0.1:5501"})
    warnings = logs.events("plaintext_on_network")
    assert [w["address"] for w in warnings] == ["tcp://0.0.0.0:5500"]
    assert "--secret-key and --client-keys" in warnings[0]["how"]


def test_throttle_says_a_repeat_once_per_interval() -> None:
    throttle = Throttle(10.0)
    assert throttle.due("k", now=0.0) == 0
    assert throttle.due("k", now=1.0) is None and throttle.due("k", now=2.0) is None
    assert throttle.due("k", now=10.5) == 2


# ---- the client against a CURVE broker ----------------------------------------------------------------------
@dataclass
class Keys:
    root: Path
    broker: Path
    client: Path
    stranger: Path
    allowed: Path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    for name in ("broker", "client", "stranger"):
        generate_key_pair(tmp_path, name)
    allowed = tmp_path / "clients"
    allowed.mkdir()
    shutil.copy(tmp_path / "client.key", allowed)
    return Keys(tmp_path, tmp_path / "broker.key", tmp_path / "client.key_secret", tmp_path / "stranger.key_secret",
                allowed)


class EchoBroker:
    """A ROUTER bound like the broker's client socket (CURVE or not) that answers every request with its input."""

    def __init__(self, security: Security) -> None:
        self.socket = new_socket(zmq.Context.instance(), zmq.ROUTER, curve=security.server(Domain.CLIENTS))
        self.address = bind(self.socket, "tcp://127.0.0.1:0", "test broker")
        self.identities: set[bytes] = set()

    def serve_one(self, timeout_s: float = 5.0) -> Request:
        assert self.socket.poll(int(timeout_s * 1000)), "no request arrived"
        identity, header, *values = self.socket.recv_multipart()
        self.identities.add(identity)
        request = decode(header, Request)
        specs, frames = encode_instances([{"y": np.frombuffer(values[0], np.float32).reshape(2, 3)}])
        self.socket.send_multipart([identity, encode(Reply(id=request.id, instances=specs)), *frames])
        return request

    def nothing_arrived(self) -> bool:
        return not self.socket.poll(100)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def curve_broker(keys: Keys) -> Iterator[EchoBroker]:
    broker = EchoBroker(Security.load(keys.root / "broker.key_secret", {Domain.CLIENTS: keys.allowed}))
    yield broker
    broker.close()


def infer_in_background(client: Client, broker: EchoBroker, asynchronous: bool) -> dict:
    if asynchronous:
        future = client.infer_async(ONES, timeout=DEADLINE_S)
        broker.serve_one()
        return future.result(timeout=5)[0]
    import threading

    result: dict = {}
    caller = threading.Thread(target=lambda: result.update(client.infer(ONES, timeout=DEADLINE_S)[0]))
    caller.start()
    broker.serve_one()
    caller.join(5)
    return result


@pytest.mark.parametrize("asynchronous", [False, True], ids=["infer", "infer_async"])
def test_a_client_with_an_allowed_key_is_served(curve_broker: EchoBroker, keys: Keys, asynchronous: bool) -> None:
    with Client(curve_broker.address, "s", "m", server_public_key=keys.broker, secret_key=keys.client) as client:
        result = infer_in_background(client, curve_broker, asynchronous)
    np.testing.assert_array_equal(result["y"], ONES["x"])


def call(client: Client, asynchronous: bool) -> ClientError:
    started = time.monotonic()
    with pytest.raises(ClientError) as caught:
        if asynchronous:
            client.infer_async(ONES, timeout=DEADLINE_S).result(timeout=DEADLINE_S + 1)
        else:
            client.infer(ONES, timeout=DEADLINE_S)
    assert time.monotonic() - started < 3.0, "a refusal must not wait for the deadline"
    return caught.value


REFUSALS = {
    "no keys": ({}, "the server requires CURVE and this side has no keys"),
    "unknown key": ({"server_public_key": "broker.key", "secret_key": "stranger.key_secret"},
                    "the server does not know this side's public key"),
    "wrong server key": ({"server_public_key": "stranger.key", "secret_key": "client.key_secret"},
                         "the public key this side holds for it is not its key"),
}


@pytest.mark.parametrize("asynchronous", [False, True], ids=["infer", "infer_async"])
@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refusal_is_unauthenticated_at_once_and_stays_so(curve_broker: EchoBroker, keys: Keys, case: str,
                                                              asynchronous: bool) -> None:
    arguments, why = REFUSALS[case]
    options = {name: keys.root / file for name, file in arguments.items()}
    with Client(curve_broker.address, "s", "m", **options) as client:
        for _ in range(2):  # the refused connection is dropped; the next call tries a new one, refused again
            error = call(client, asynchronous)
            assert error.code is ErrorCode.UNAUTHENTICATED
            assert error.message.startswith(f"the broker at {client.address} refused the connection: ")
            assert why in error.message
    assert curve_broker.nothing_arrived()


def test_keys_against_a_plaintext_broker_are_refused_too(keys: Keys) -> None:
    broker = EchoBroker(PLAINTEXT)
    try:
        with Client(broker.address, "s", "m", server_public_key=keys.broker, secret_key=keys.client) as client:
            error = call(client, asynchronous=False)
        assert error.code is ErrorCode.UNAUTHENTICATED and "does not use CURVE" in error.message
    finally:
        broker.close()


def test_one_key_without_the_other_is_a_value_error(keys: Keys) -> None:
    with pytest.raises(ValueError, match="got only server_public_key"):
        Client("127.0.0.1:1", "s", "m", server_public_key=keys.broker)
    with pytest.raises(ValueError, match="got only secret_key"):
        Client("127.0.0.1:1", "s", "m", secret_key=keys.client)


def test_the_server_logs_each_refusal_with_the_peers_address(curve_broker: EchoBroker, keys: Keys,
                                                             logs: Logs) -> None:
    stranger = KeyPair.load(keys.stranger)
    with Client(curve_broker.address, "s", "m", server_public_key=keys.broker, secret_key=stranger) as client:
        call(client, asynchronous=False)
    with Client(curve_broker.address, "s", "m") as client:
        call(client, asynchronous=False)
    refused = wait_for(lambda: logs.events("peer_refused"))
    failed = wait_for(lambda: logs.events("handshake_failed"))
    assert refused[0]["peer"] == "127.0.0.1" and refused[0]["key"] == stranger.public.decode()
    assert refused[0]["domain"] == "clients" and refused[0]["why"] == "unknown key"
    assert failed[0]["why"] in KEYLESS_PEER
    assert failed[0]["endpoint"] == curve_broker.address


KEYLESS_PEER = {"a peer without CURVE keys tried to connect", "a peer hung up during the handshake (it has no CURVE "
                "keys, or holds another public key for this server)"}
"""Which side notices the mechanism mismatch first is a race; the server sees either."""


def test_a_key_added_to_the_folder_is_admitted_after_a_reload(curve_broker: EchoBroker, keys: Keys) -> None:
    newcomer = keys.root / "newcomer"
    generate_key_pair(newcomer, "client2")
    with Client(curve_broker.address, "s", "m", server_public_key=keys.broker,
                secret_key=newcomer / "client2.key_secret") as client:
        assert call(client, asynchronous=False).code is ErrorCode.UNAUTHENTICATED
        shutil.copy(newcomer / "client2.key", keys.allowed)
        reload_allowed_keys()
        result = infer_in_background(client, curve_broker, asynchronous=False)
    np.testing.assert_array_equal(result["y"], ONES["x"])


def test_a_hang_up_is_a_refusal_only_twice_in_a_row() -> None:
    """A server that notices a mechanism mismatch (or a wrong key) first just hangs up; once may be a server
    dying mid-handshake, twice in a row is a refusal."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    try:
        for curve, refusal in ((False, Refusal.NEEDS_CURVE), (True, Refusal.WRONG_SERVER_KEY)):
            handshake = Handshake(socket, curve)
            handshake.take(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32)
            assert handshake.refusal is None
            handshake.take(zmq.EVENT_HANDSHAKE_SUCCEEDED, 0)
            handshake.take(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32)
            assert handshake.refusal is None
            handshake.take(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32)
            assert handshake.refusal is refusal
            handshake.close(socket)
    finally:
        socket.close(linger=0)


@pytest.mark.parametrize(("command", "missing"), [
    (["broker"], "--secret-key, --client-keys, --worker-keys"),
    (["serve", "--servable", "s"], "--secret-key, --client-keys, --agent-keys"),
    (["serve", "--servable", "s", "--worker-bind", "tcp://127.0.0.1:1"],
     "--secret-key, --client-keys, --worker-keys, --agent-keys"),
    (["worker", "--servable", "s"], "--secret-key, --agent-keys, --broker-key"),
    (["agent", "--model-files", "m.mindir"], "--secret-key, --worker-key"),
    (["gateway"], "--secret-key, --broker-key"),
])
def test_require_curve_refuses_to_start_without_keys(tmp_path: Path, command: list[str], missing: str) -> None:
    if command[0] in ("serve", "worker"):
        command = [*command, "--servable-dir", str(tmp_path)]
    result = CliRunner().invoke(main, [*command, "--require-curve"])
    assert result.exit_code == 1
    assert f"--require-curve: {missing} not given" in result.output


def test_a_folder_of_keys_without_a_secret_key_refuses_to_start(keys: Keys) -> None:
    result = CliRunner().invoke(main, ["broker", "--client-keys", str(keys.allowed)])
    assert result.exit_code == 1 and "--client-keys need --secret-key" in result.output
