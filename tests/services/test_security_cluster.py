"""CURVE on real clusters: every link encrypted and authenticated, strangers refused without disturbing anything.

- A MatMul cluster (broker, worker, launcher) with CURVE and --require-curve on every process serves correctly,
  and the bytes of a request cannot be read on the wire: a TCP tap between client and broker, and (as root) a
  raw capture of every loopback packet, find none of the input tensor's bytes. The same checks on a plaintext
  cluster find them, so the checks can fail.
- Strangers (an unknown key, or no key) on every port of the worker and the broker: AGENT_REGISTER naming a
  serving agent's pid, a worker's WORKER_STATUS, subscriptions and fuzzed frames, while requests run. Every
  request is served, no agent restarts, no second worker registers, and each refusal is logged with the peer's
  address. The same AGENT_REGISTER over plaintext does reach a plaintext worker (it answers), so the attack is
  real.
- A two-stage MLP (rank_size 4, stage_size 2) whose stages run on two "machines" with their own key pairs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from tests.cluster import (
    MATMUL_CONFIG,
    MLP_EXAMPLE,
    Cluster,
    Exports,
    child_pids,
    free_port_range,
    listening_endpoints,
    load_example_module,
    log_events,
    matmul_reference,
    start_matmul_cluster,
    wait_for,
    write_servable,
)
from zmserve.bench.records import OK
from zmserve.client import Client, ClientError
from zmserve.collective_tls import generate as generate_collective_tls
from zmserve.protocol import AgentRegister, BrokerCommand, ErrorCode, WorkerStatus, encode
from zmserve.security import CurveClient, KeyPair, generate_key_pair, load_public_key
from zmserve.transport import new_socket
from zmserve_services.agent.processes import publish_address

pytestmark = pytest.mark.slow

X = np.random.default_rng(14).standard_normal((128, 96)).astype(np.float32)


@pytest.fixture(scope="module")
def curve_matmul(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> Iterator[Cluster]:
    cluster = start_matmul_cluster(tmp_path_factory.mktemp("curve_matmul"), exports, 2, curve=True)
    yield cluster
    codes = cluster.stop()
    assert set(codes.values()) == {0}, codes


# ---- the bytes on the wire ----------------------------------------------------------------------------------
class TcpTap:
    """A TCP proxy on loopback that keeps every byte it forwards, each direction apart."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.to_server, self.to_client = bytearray(), bytearray()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
                self.sockets += [client, server]
                threading.Thread(target=self.pump, args=(client, server, self.to_server), daemon=True).start()
                threading.Thread(target=self.pump, args=(server, client, self.to_client), daemon=True).start()

    @staticmethod
    def pump(source: socket.socket, sink: socket.socket, kept: bytearray) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(1 << 16):
                kept += chunk
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for each in self.sockets:
            each.close()


class LoopbackCapture:
    """Every packet on the loopback interface while it runs (AF_PACKET: needs CAP_NET_RAW)."""

    def __init__(self) -> None:
        self.raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))  # ETH_P_ALL
        self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)  # other tests share the loopback
        self.raw.bind(("lo", 0))
        self.raw.settimeout(0.05)
        self.packets: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while self.running:
            with contextlib.suppress(TimeoutError):
                self.packets.append(self.raw.recv(1 << 17))

    def stop(self) -> bytes:
        self.running = False
        self.thread.join()
        self.raw.close()
        return b"".join(self.packets)


def fragments(data: bytes, count: int = 24, size: int = 48) -> list[bytes]:
    """Slices spread over `data`: each would show a copy of it (even one cut in TCP segments) on the wire."""
    step = (len(data) - size) // (count - 1)
    return [data[i * step:i * step + size] for i in range(count)]


def found(data: bytes, haystack: bytes | bytearray) -> int:
    return sum(fragment in haystack for fragment in fragments(data))


def client_through(cluster: Cluster, address: str) -> Client:
    keys = cluster.keys
    if keys is None:
        return Client(address, cluster.servable, "predict")
    return Client(address, cluster.servable, "predict", server_public_key=keys.public("broker"),
                  secret_key=keys.secret("client"))


def tapped_request(cluster: Cluster) -> tuple[TcpTap, np.ndarray]:
    """One request through a tap; the tap and the output it carried back."""
    tap = TcpTap(cluster.client_address)
    try:
        with client_through(cluster, tap.address) as client:
            y = client.infer({"x": X}, timeout=30)[0]["y"]
        np.testing.assert_allclose(y, matmul_reference(X), atol=1e-5)
        assert len(tap.to_server) > X.nbytes and len(tap.to_client) > y.nbytes  # everything went through the tap
    finally:
        tap.close()
    return tap, y


def test_curve_hides_the_tensors_between_client_and_broker(curve_matmul: Cluster) -> None:
    tap, y = tapped_request(curve_matmul)
    assert found(X.tobytes(), tap.to_server) == 0
    assert found(y.tobytes(), tap.to_client) == 0


def test_plaintext_shows_the_tensors_between_client_and_broker(matmul_tp2: Cluster) -> None:
    tap, y = tapped_request(matmul_tp2)
    assert found(X.tobytes(), tap.to_server) == len(fragments(X.tobytes()))
    assert found(y.tobytes(), tap.to_client) == len(fragments(y.tobytes()))


def captured_request(cluster: Cluster) -> bytes:
    try:
        capture = LoopbackCapture()
    except PermissionError:
        pytest.skip("capturing loopback packets needs CAP_NET_RAW (root)")
    try:
        with cluster.client() as client:
            client.infer({"x": X}, timeout=30)
    finally:
        packets = capture.stop()
    assert len(packets) > X.nbytes
    return packets


def test_curve_hides_the_input_on_every_loopback_link(curve_matmul: Cluster) -> None:
    """client -> broker -> worker -> both agents: the input is on four links, encrypted on each (the agents'
    MindSpore collectives carry partial outputs only, in clear: docs/SECURITY.md)."""
    assert found(X.tobytes(), captured_request(curve_matmul)) == 0


def test_plaintext_shows_the_input_on_the_loopback_links(matmul_tp2: Cluster) -> None:
    assert found(X.tobytes(), captured_request(matmul_tp2)) >= len(fragments(X.tobytes())) // 2


# ---- strangers ----------------------------------------------------------------------------------------------
def stranger_socket(kind: int, address: str, keys: KeyPair | None, server_key: bytes | None) -> zmq.Socket:
    curve = CurveClient(keys, server_key, watch=False) if keys is not None and server_key is not None else None
    sock = new_socket(zmq.Context.instance(), kind, curve=curve)
    sock.connect(address)
    return sock


def garbage(rng: random.Random) -> list[bytes]:
    return [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(1, 4))]


class Requests(threading.Thread):
    """Requests one after another until stopped, each checked against numpy."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.stopped = threading.Event()
        self.served = 0
        self.failures: list[str] = []

    def run(self) -> None:
        rng = np.random.default_rng(7)
        with self.cluster.client() as client:
            while not self.stopped.is_set():
                x = rng.standard_normal((128, 96)).astype(np.float32)
                try:
                    y = client.infer({"x": x}, timeout=10)[0]["y"]
                    np.testing.assert_allclose(y, matmul_reference(x), atol=1e-5)
                    self.served += 1
                except Exception as error:  # every failure is reported by the test
                    self.failures.append(f"{type(error).__name__}: {error}")


def test_strangers_can_neither_register_nor_disturb_a_serving_cluster(curve_matmul: Cluster, tmp_path: Path) -> None:
    cluster = curve_matmul
    assert cluster.keys is not None
    stranger = KeyPair.load(generate_key_pair(tmp_path, "stranger")[1])
    worker_key = load_public_key(cluster.keys.public("worker"))
    broker_key = load_public_key(cluster.keys.public("broker"))
    agents_before = set(child_pids(cluster.processes["agents"].pid))
    worker_endpoints = listening_endpoints(cluster.processes["worker"].pid)
    assert f"tcp://{cluster.distributed_address}" in worker_endpoints and len(worker_endpoints) >= 3
    broker_workers, broker_clients = cluster.worker_address, cluster.client_address
    register = encode(AgentRegister(rank=0, host="127.0.0.1", pid=99, model_file="x", publish_address="tcp://x:1",
                                    replaces_pid=min(agents_before)))
    impostor = encode(WorkerStatus(servable="matmul", version=1, methods=["predict"], ready=True, reason=""))
    rng = random.Random(14)

    requests = Requests(cluster)
    requests.start()
    wait_for(lambda: requests.served >= 3, 60, what="requests flowing")
    sockets = []
    try:
        for keys in (stranger, None):
            # the distributed address (ROUTER), the stage-0 XPUB and the results PULL (on loopback these two are
            # abstract Unix sockets, which any local process can reach), and the metrics endpoint
            for address in worker_endpoints:
                dealer = stranger_socket(zmq.DEALER, address, keys, worker_key)
                sub = stranger_socket(zmq.SUB, address, keys, worker_key)
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                push = stranger_socket(zmq.PUSH, address, keys, worker_key)
                sockets += [dealer, sub, push]
                for _ in range(20):
                    with contextlib.suppress(zmq.Again):
                        dealer.send_multipart([register], flags=zmq.NOBLOCK)
                        dealer.send_multipart(garbage(rng), flags=zmq.NOBLOCK)
                        push.send_multipart(garbage(rng), flags=zmq.NOBLOCK)
            worker = stranger_socket(zmq.DEALER, broker_workers, keys, broker_key)
            client = stranger_socket(zmq.DEALER, broker_clients, keys, broker_key)
            sockets += [worker, client]
            for _ in range(20):
                with contextlib.suppress(zmq.Again):
                    worker.send_multipart([BrokerCommand.CONTROL, impostor], flags=zmq.NOBLOCK)
                    client.send_multipart(garbage(rng), flags=zmq.NOBLOCK)
        wait_for(lambda: [e for e in log_events(cluster.logs["worker"], "peer_refused")
                          if e.get("key") == stranger.public.decode()], 30, what="the worker's refusal log line")
        wait_for(lambda: len({e["domain"] for e in log_events(cluster.logs["broker"], "peer_refused")}) == 2, 30,
                 what="the broker's refusal of the stranger on both of its sockets")
        wait_for(lambda: log_events(cluster.logs["worker"], "handshake_failed"), 30,
                 what="the worker's line about peers without keys")
        served_before = requests.served
        wait_for(lambda: requests.served >= served_before + 20, 60, what="more requests after the attacks")
        for sock in sockets:
            assert not sock.poll(0), "a stranger got an answer"
    finally:
        requests.stopped.set()
        requests.join(30)
        for sock in sockets:
            sock.close()

    assert not requests.failures, requests.failures[:5]
    refusals = [e for e in log_events(cluster.logs["worker"], "peer_refused")
                if e.get("key") == stranger.public.decode()]
    assert {e["why"] for e in refusals} == {"unknown key"}
    over_tcp = [e for e in refusals if e["peer"] == "127.0.0.1"]  # over ipc the peer is ZAP's "uid:gid:pid" form
    assert over_tcp and {e["domain"] for e in over_tcp} == {"agents"}
    assert {e["why"] for e in log_events(cluster.logs["worker"], "handshake_failed")} <= {
        "a peer without CURVE keys tried to connect",
        "a peer hung up during the handshake (it has no CURVE keys, or holds another public key for this server)"}
    assert set(child_pids(cluster.processes["agents"].pid)) == agents_before, "an agent was restarted"
    assert not log_events(cluster.logs["worker"], "agent_lost")
    assert len(log_events(cluster.logs["broker"], "worker_registered")) == 1, "a stranger registered as a worker"
    cluster.check_alive()


def test_the_same_registration_reaches_a_plaintext_worker(matmul_tp2: Cluster) -> None:
    """The attack above is real: without CURVE the worker reads a stranger's AGENT_REGISTER and answers it (here
    with a rank it refuses, so the serving cluster is left alone)."""
    dealer = stranger_socket(zmq.DEALER, f"tcp://{matmul_tp2.distributed_address}", None, None)
    try:
        dealer.send(encode(AgentRegister(rank=99, host="127.0.0.1", pid=99, model_file="x",
                                         publish_address="tcp://x:1")))
        assert dealer.poll(10_000), "no answer"
        assert msgpack.unpackb(dealer.recv())["type"] == "agent_rejected"
    finally:
        dealer.close()


def run_launcher(cluster: Cluster, model_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zmserve.cli", "agent", "--worker", cluster.distributed_address,
                           "--model-files", str(model_file), *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "GLOG_v": "3"})


@pytest.mark.parametrize("keys", ["stranger", "none"])
def test_a_launcher_the_worker_refuses_stops_with_the_reason(curve_matmul: Cluster, tmp_path: Path, keys: str,
                                                             exports: Exports) -> None:
    assert curve_matmul.keys is not None
    args = ["--secret-key", str(generate_key_pair(tmp_path, "stranger")[1]), "--worker-key",
            curve_matmul.keys.public("worker")] if keys == "stranger" else []
    started = time.monotonic()
    done = run_launcher(curve_matmul, exports.matmul(2)[0], *args)
    assert done.returncode == 1 and time.monotonic() - started < 30
    why = "the server does not know this side's public key" if keys == "stranger" else \
        "the server requires CURVE and this side has no keys"
    assert f"the worker at tcp://{curve_matmul.distributed_address} refused this launcher: {why}" in done.stderr


# ---- a pipeline on two machines -----------------------------------------------------------------------------
mlp = load_example_module(MLP_EXAMPLE / "export_model.py", "mlp_export")


def test_a_fully_secured_pipeline_whose_stages_hold_different_keys(tmp_path: Path, exports: Exports) -> None:
    """Ranks 0-1 on machine host-a, ranks 2-3 on host-b, each with its own key pair: stage 0's leader admits
    host-b's agents on its publisher because the worker names their keys (AGENT_CONFIGURE downstream_keys). With
    MindSpore's TLS in both stages' groups too, neither the input nor the output of a request appears on any
    loopback packet."""
    model_files = exports.mlp(4, 2)
    servable_dir = write_servable(tmp_path / "servables", "mlp", MATMUL_CONFIG.format(rank_size=4, stage_size=2))
    tls = str(generate_collective_tls(tmp_path / "collective"))
    cluster = Cluster(tmp_path, servable_dir, "mlp", None, ["--collective-tls", tls], curve=True)
    assert cluster.keys is not None
    leader_port = free_port_range(2)  # rank 0, stage 0's leader, publishes to stage 1 on this port
    cluster.start_agents("host_a", model_files[:2], "--rank-start", "0", "--agent-start-port", str(leader_port),
                         "--collective-tls", tls)
    cluster.start_agents("host_b", model_files[2:], "--rank-start", "2", "--secret-key", cluster.keys.secret("host-b"),
                         "--collective-tls", tls)
    weights = mlp.make_weights(mlp.DEFAULT_LAYERS, mlp.DEFAULT_HIDDEN, mlp.DEFAULT_FFN)
    rng = np.random.default_rng(42)
    try:
        cluster.wait_ready({"x": np.zeros((mlp.DEFAULT_BATCH, mlp.DEFAULT_HIDDEN), np.float32)})
        with cluster.client() as client:
            for _ in range(3):
                x = rng.standard_normal((mlp.DEFAULT_BATCH, mlp.DEFAULT_HIDDEN)).astype(np.float32)
                y = client.infer({"x": x}, timeout=60)[0]["y"]
                np.testing.assert_allclose(y, mlp.reference_forward(x, weights), atol=1e-5, rtol=0)
            with contextlib.suppress(PermissionError):  # as root: watch every packet of one more request
                capture = LoopbackCapture()
                try:
                    y = client.infer({"x": x}, timeout=60)[0]["y"]
                finally:
                    packets = capture.stop()
                assert found(x.tobytes(), packets) == 0 and found(y.tobytes(), packets) == 0
        # the leader's publisher admits the next stage's agents only: a stranger that holds its public key is not
        stranger = KeyPair.load(generate_key_pair(tmp_path, "stranger")[1])
        sub = stranger_socket(zmq.SUB, publish_address("127.0.0.1", leader_port), stranger,
                              load_public_key(cluster.keys.public("host-a")))
        try:
            refused = wait_for(lambda: [e for e in log_events(cluster.logs["host_a"], "peer_refused")
                                        if e.get("key") == stranger.public.decode()], 30, what="the leader's refusal")
        finally:
            sub.close()
        assert refused[0]["domain"] == "downstream"  # (on loopback the publisher is an abstract Unix socket)
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes
    assert not log_events(cluster.logs["host_b"], "agent_refused")


# ---- the gateway: HTTPS and a token in front, CURVE behind ----------------------------------------------------
def test_a_gateway_serves_https_with_a_token_over_a_curve_link(curve_matmul: Cluster, tmp_path: Path) -> None:
    from tests.services.gateway.gateway_client import curl, self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)
    (tmp_path / "token").write_text("t0ken\n")
    url = curve_matmul.start_gateway("gateway_tls", "--certfile", str(cert), "--keyfile", str(key),
                                     "--auth-token-file", str(tmp_path / "token"), cafile=str(cert), token="t0ken")
    body = ('{"instances": [{"x": ' + str(X.tolist()) + '}]}').encode()
    status, answer = curl(url, "/model/matmul:predict", body, "POST", "--cacert", str(cert),
                          "-H", "Authorization: Bearer t0ken")
    assert status == 200, answer
    np.testing.assert_allclose(np.array(answer["instances"][0]["y"], np.float32), matmul_reference(X), atol=1e-5)
    assert curl(url, "/model/matmul:predict", body, "POST", "--cacert", str(cert))[0] == 401


def test_a_gateway_whose_key_the_broker_refuses_answers_502_at_once(curve_matmul: Cluster, tmp_path: Path) -> None:
    from tests.services.gateway.gateway_client import curl

    assert curve_matmul.keys is not None
    stranger = generate_key_pair(tmp_path, "stranger")[1]
    url = curve_matmul.start_gateway("gateway_stranger", "--secret-key", str(stranger))
    body = ('{"instances": [{"x": ' + str(X.tolist()) + '}]}').encode()
    wait_for(lambda: log_events(curve_matmul.logs["gateway_stranger"], "handshake_refused"), 30,
             what="the gateway's refusal line")
    started = time.monotonic()
    status, answer = curl(url, "/model/matmul:predict", body)
    assert status == 502 and time.monotonic() - started < 5
    assert "refused this process: the server does not know this side's public key" in answer["error_msg"]


def test_zmserve_bench_measures_a_curve_cluster_with_keys_and_is_refused_without(curve_matmul: Cluster) -> None:
    assert curve_matmul.keys is not None
    command = [sys.executable, "-m", "zmserve.cli", "bench", "run", "--address", curve_matmul.client_address,
               "--servable", "matmul", "--shape", "128x96", "--requests", "5", "--timeout", "30"]
    keys = ["--broker-key", curve_matmul.keys.public("broker"), "--secret-key", curve_matmul.keys.secret("client")]
    served = subprocess.run([*command, *keys], capture_output=True, text=True, timeout=120)
    assert served.returncode == 0, served.stderr[-2000:]
    assert [json.loads(line)["status"] for line in served.stdout.splitlines()] == [OK] * 5
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert {json.loads(line)["status"] for line in refused.stdout.splitlines()} == {"UNAUTHENTICATED"}


def test_zmserve_status_asks_a_curve_broker_with_keys_and_names_them_without(curve_matmul: Cluster) -> None:
    assert curve_matmul.keys is not None
    command = [sys.executable, "-m", "zmserve.cli", "status", "--json", "--timeout", "3", "--broker",
               curve_matmul.client_address]
    keys = ["--broker-key", curve_matmul.keys.public("broker"), "--secret-key", curve_matmul.keys.secret("client")]
    answered = subprocess.run([*command, *keys], capture_output=True, text=True, timeout=60)
    assert answered.returncode == 0, answered.stderr[-2000:]
    assert [s["servable"] for s in json.loads(answered.stdout)["servables"]] == ["matmul"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "needs --secret-key and --broker-key" in refused.stderr.splitlines()[-1]


def test_zmserve_serve_with_curve_serves(tmp_path: Path, exports: Exports) -> None:
    """Broker and worker in one process: one key pair and one authenticator for its client and agent sockets."""
    cluster = start_matmul_cluster(tmp_path, exports, 2, colocated=True, curve=True)
    try:
        with cluster.client() as client:
            np.testing.assert_allclose(client.infer({"x": X}, timeout=30)[0]["y"], matmul_reference(X), atol=1e-5)
        with Client(cluster.client_address, "matmul", "predict") as stranger, pytest.raises(ClientError) as refused:
            stranger.infer({"x": X}, timeout=30)
        assert refused.value.code == ErrorCode.UNAUTHENTICATED
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes
