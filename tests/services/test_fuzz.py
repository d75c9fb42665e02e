"""Fuzzing the two ROUTERs a stranger can reach: the broker's client socket and the worker's agent socket.

Seeded random and mutated messages go to a dedicated rank_size-2 MatMul cluster from raw DEALERs. Every message
to the broker must get exactly one reply carrying the id the protocol says it can read (PROTOCOL.md 2.1, 3); the
agent socket answers only AGENT_REGISTER (rejected: the cluster is complete) and RANK_TABLE_QUERY. Valid requests
interleaved with the garbage, and sent after it, must still be answered correctly, and nothing may die or
restart.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from tests.cluster import Exports, agent_pids, log_events, matmul_reference, start_matmul_cluster
from zmserve.client import ClientError
from zmserve.local import LocalCluster

pytestmark = pytest.mark.slow

SEED = 20240604
BROKER_MESSAGES = 12000
AGENT_MESSAGES = 4000
VALID_EVERY = 25
"""Every this many broker messages, one is a valid request whose answer is checked numerically."""
WINDOW = 64
"""Unanswered messages per broker socket: the broker drops replies to a client that stops reading."""
FUZZ_DEADLINE_S = 90.0
ONES = {"x": np.ones((128, 96), np.float32)}
HEADER_TYPES = ("request", "reply", "error", "cancel", "worker_status", "worker_disconnect", "heartbeat",
                "agent_register", "agent_configure", "agent_ready", "agent_failed", "agent_rejected", "agent_shutdown",
                "agent_stopped", "rank_table_query", "rank_table", "launcher_hello", "agents_shut_down",
                "agent_exited", "metadata_query", "metadata", "status_query", "status", "model_call", "model_result",
                "model_error")
"""The message types of PROTOCOL.md 1.1, spelled out here so the test does not trust the code's own list."""
VERSION = 2


def packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def read_header(frame: bytes) -> tuple[dict | None, Any]:
    """What PROTOCOL.md says a receiver reads from a header frame: (the header if its version and type are
    valid, else None; the id an error reply carries: an int or str `id` of a msgpack map, else None). Raises
    Malformed when the frame is not well-formed msgpack: there, which id a decoder still finds depends on how it
    skips the broken part, so the test only checks that exactly one reply comes back."""
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:
        raise Malformed from None
    if not isinstance(header, dict):
        return None, None
    request_id = header.get("id")
    request_id = request_id if is_int(request_id) or isinstance(request_id, str) else None
    if is_int(header.get("v")) and header["v"] == VERSION and header.get("type") in HEADER_TYPES:
        return header, request_id
    return None, request_id


class Malformed(Exception):
    pass


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_cancel(header: dict | None) -> bool:
    """A readable CANCEL (an int or str id): the broker answers the request it names, if it holds it, and never
    the cancel itself (PROTOCOL.md 4.1)."""
    return header is not None and header["type"] == "cancel" and (is_int(header.get("id"))
                                                                   or isinstance(header.get("id"), str))


def id_key(value: Any) -> bytes:
    """Ids compared as their msgpack bytes: NaN, lists and maps are ids too."""
    return packb(value)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, exports: Exports) -> Iterator[LocalCluster]:
    cluster = start_matmul_cluster(tmp_path_factory.mktemp("fuzz"), exports, 2)
    try:
        yield cluster
    finally:
        cluster.stop()


class Garbage:
    """Random values of every msgpack type, biased towards the ones that break code."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def blob(self, low: int = 0, high: int = 64) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))

    def scalar(self) -> Any:
        r = self.rng
        return r.choice([
            lambda: r.randint(-(2**63), 2**64 - 1), lambda: r.randint(-3, 3), lambda: 2**64 - 1, lambda: -(2**63),
            lambda: r.uniform(-1e9, 1e9), lambda: math.nan, lambda: math.inf, lambda: -0.0,
            lambda: "".join(r.choice("abcxyz_ \u00e9\u4e2d\U0001f600") for _ in range(r.randint(0, 12))),
            lambda: self.blob(0, 16), lambda: r.choice([True, False]), lambda: None,
            lambda: msgpack.ExtType(r.randint(0, 127), self.blob(0, 8)),
        ])()

    def value(self, depth: int = 0) -> Any:
        if depth >= 3 or self.rng.random() < 0.6:
            return self.scalar()
        if self.rng.random() < 0.5:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return {self.rng.choice(["v", "type", "id", "x", "", "shape"]) + str(self.rng.randint(0, 3)):
                self.value(depth + 1) for _ in range(self.rng.randint(0, 4))}

    def msgpack_blob(self) -> bytes:
        """Valid msgpack that is not a valid header, or a map with non-string keys, or bytes that merely start
        like msgpack."""
        r = self.rng
        choice = r.randrange(5)
        if choice == 0:
            return packb(self.value())
        if choice == 1:
            return packb({r.randint(0, 9): self.value() for _ in range(r.randint(1, 3))})
        if choice == 2:
            return packb({"v": VERSION, "type": r.choice(HEADER_TYPES), **{f"k{i}": self.value() for i in range(3)}})
        if choice == 3:
            return bytes([r.choice([0x80 + r.randint(0, 15), 0xDE, 0xDF, 0xC4, 0xD9, 0xDD])]) + self.blob(0, 12)
        return b"\x91" * r.randint(100, 3000) + b"\x00"  # deep nesting


@dataclass
class Expectations:
    """What must come back to the broker sockets: one reply per message, with the id the protocol can read."""

    ids: Counter = field(default_factory=Counter)
    replies: Counter = field(default_factory=Counter)
    malformed: int = 0
    """Messages whose header is not well-formed msgpack: each gets one reply, with whatever id is found."""
    codes: Counter = field(default_factory=Counter)
    valid: dict[bytes, np.ndarray] = field(default_factory=dict)
    valid_ok: int = 0
    problems: list[str] = field(default_factory=list)


class BrokerFuzzer:
    """Requests mutated in one to three ways, raw garbage, and now and then a valid request."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.garbage = Garbage(rng)
        self.next_id = 1_000_000
        self.x_rng = np.random.default_rng(rng.randrange(2**32))

    def valid(self, request_id: Any) -> tuple[dict, list[bytes], np.ndarray]:
        x = self.x_rng.standard_normal((128, 96)).astype(np.float32)
        header = {"v": VERSION, "type": "request", "id": request_id, "servable": "matmul", "method": "predict",
                  "version": 0, "timeout_ms": 20000,
                  "instances": [[{"name": "x", "dtype": "float32", "shape": [128, 96]}]]}
        return header, [x.tobytes()], x

    def message(self) -> list[bytes]:
        r = self.rng
        kind = r.random()
        if kind < 0.12:
            return [self.garbage.blob(0, r.choice([8, 64, 4096])) for _ in range(r.randint(1, 4))]
        if kind < 0.25:
            return [self.garbage.msgpack_blob()] + [self.garbage.blob() for _ in range(r.randint(0, 2))]
        self.next_id += 1
        header, frames, _ = self.valid(self.next_id)
        for _ in range(r.randint(1, 3)):
            header, frames = r.choice(self.mutations)(self, header, frames)
        head = header if isinstance(header, bytes) else packb(header)
        return [head, *frames]

    # ---- mutations: each takes (header dict or packed bytes, value frames) and returns the same -----------------
    def drop_field(self, header: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        if isinstance(header, dict) and header:
            header = dict(header)
            header.pop(self.rng.choice(list(header)))
        return header, frames

    def retype_field(self, header: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        if isinstance(header, dict):
            key = self.rng.choice(["v", "type", "id", "servable", "method", "version", "timeout_ms", "instances",
                                   "extra"])
            header = {**header, key: self.garbage.value()}
        return header, frames

    def protocol(self, header: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        if isinstance(header, dict):
            r = self.rng
            header = {**header, "v": r.choice([0, 1, 99, "2", None, 2.0, True])} if r.random() < 0.5 else \
                {**header, "type": r.choice([*HEADER_TYPES, "REQUEST", "request ", "", "nope"])}
        return header, frames

    def routing(self, header: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        if isinstance(header, dict):
            r = self.rng
            field_name, value = r.choice([("servable", "nosuch"), ("servable", ""), ("method", "train"),
                                          ("version", 7), ("version", -1), ("version", 2**64 - 1), ("version", 1)])
            header = {**header, field_name: value}
        return header, frames

    def deadline(self, header: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        if isinstance(header, dict):
            header = {**header, "timeout_ms": self.rng.choice([0, 1, -5, 2**64 - 1, 1e300, math.nan, math.inf,
                                                               "10", None, 0.5, True])}
        return header, frames

    def request_id(self, header: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        if isinstance(header, dict):
            r = self.rng
            header = {**header, "id": r.choice([
                lambda: f"s{self.next_id}", lambda: f"b{self.next_id}".encode(), lambda: self.next_id + 0.5,
                lambda: math.nan, lambda: [self.next_id], lambda: {"a": self.next_id}, lambda: None,
                lambda: r.randint(0, 5), lambda: -self.next_id, lambda: msgpack.ExtType(1, b"%d" % self.next_id),
            ])()}
        return header, frames

    def descriptor(self, header: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        if not isinstance(header, dict) or not isinstance(header.get("instances"), list) \
                or not header["instances"] or not isinstance(header["instances"][0], list) \
                or not header["instances"][0] or not isinstance(header["instances"][0][0], dict):
            return header, frames
        r = self.rng
        descriptor = dict(header["instances"][0][0])
        key, value = r.choice([
            ("dtype", r.choice(["float64", "float16", "int32", "uint8", "bool", "str", "bytes", "complex64",
                                "object", "bfloat16", "", None, 5, "<f4"])),
            ("shape", r.choice([[128, 95], [96, 128], [128], [], [-1, 96], [0, 96], [128, 96, 1], ["a", 96], None,
                                [1.5, 96], [2**31, 2**31], [2**62], [10**6, 10**6], [2**40, 2**20], 7])),
            ("name", r.choice(["y", "", None, 1, "X", "x\x00"])),
            (r.choice(["dtype", "shape", "name"]), "__drop__"),
        ])
        if value == "__drop__":
            descriptor.pop(key, None)
        else:
            descriptor[key] = value
        return {**header, "instances": [[descriptor], *header["instances"][1:]]}, frames

    def instances(self, header: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        if not isinstance(header, dict):
            return header, frames
        r = self.rng
        one = [{"name": "x", "dtype": "float32", "shape": [128, 96]}]
        count = r.randint(2, 5)
        choice = r.randrange(6)
        if choice == 0:
            return {**header, "instances": []}, []
        if choice == 1:
            return {**header, "instances": [[]]}, frames
        if choice == 2:  # several instances, frames for all of them: valid
            xs = [self.x_rng.standard_normal((128, 96)).astype(np.float32).tobytes() for _ in range(count)]
            return {**header, "instances": [one] * count}, xs
        if choice == 3:
            return {**header, "instances": [one] * count}, frames
        if choice == 4:
            return {**header, "instances": [one + one]}, frames * 2
        return {**header, "instances": r.choice([one, [one[0], 3], "x", {"x": one}, [[one]]])}, frames

    def value_frames(self, header: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        r = self.rng
        if not frames:
            return header, [self.garbage.blob()]
        first = frames[0]
        return header, r.choice([
            lambda: [first[: r.randrange(len(first) + 1)]], lambda: [first + self.garbage.blob(1, 8)], lambda: [],
            lambda: [*frames, self.garbage.blob()], lambda: [r.randbytes(len(first)), *frames[1:]],
            lambda: [first, first], lambda: [b""],
        ])()

    def huge_value(self, header: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        """A real 16 MiB value: the broker forwards it, the worker decodes it and refuses the shape."""
        if isinstance(header, dict) and self.rng.random() < 0.02:
            descriptor = {"name": "x", "dtype": "float32", "shape": [4096, 1024]}
            return {**header, "instances": [[descriptor]]}, [bytes(4096 * 1024 * 4)]
        return header, frames

    def bit_flip(self, header: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        packed = bytearray(header if isinstance(header, bytes) else packb(header))
        for _ in range(self.rng.randint(1, 3) if packed else 0):
            packed[self.rng.randrange(len(packed))] ^= 1 << self.rng.randrange(8)
        return bytes(packed), frames

    def truncate(self, header: Any, frames: list[bytes]) -> tuple[Any, list[bytes]]:
        packed = header if isinstance(header, bytes) else packb(header)
        return packed[: self.rng.randrange(len(packed) + 1)], frames

    mutations: tuple[Callable, ...] = (drop_field, retype_field, protocol, routing, deadline, request_id,
                                       descriptor, descriptor, instances, value_frames, value_frames, huge_value,
                                       bit_flip, truncate)


class AgentFuzzer:
    """Control messages as an agent or a launcher would send them, mutated; never naming a live agent's pid."""

    def __init__(self, rng: random.Random, agent_pids: set[int]) -> None:
        self.rng = rng
        self.garbage = Garbage(rng)
        self.agent_pids = agent_pids

    def pid(self) -> Any:
        while True:
            value = self.rng.choice([self.rng.randint(1, 2**22), self.garbage.scalar()])
            if value not in self.agent_pids:
                return value

    def message(self) -> list[bytes]:
        r = self.rng
        kind = r.random()
        if kind < 0.15:
            return [self.garbage.blob(0, 256) for _ in range(r.randint(1, 3))]
        if kind < 0.25:
            return [self.garbage.msgpack_blob()]
        rank = r.choice([0, 1, 2, -1, 2**64 - 1, "0", None, True, 1.5, [0], self.garbage.scalar()])
        header: dict[str, Any] = r.choice([
            {"type": "agent_register", "rank": rank, "host": r.choice(["127.0.0.1", "", None, 5]), "pid": self.pid(),
             "model_file": "/nonexistent", "publish_address": r.choice(["tcp://127.0.0.1:1", "", None, "garbage"]),
             "replaces_pid": r.choice([None, self.pid()])},
            {"type": "agent_ready", "rank": rank, "signature": self.garbage.value(), "load_seconds": 1.0},
            {"type": "agent_failed", "message": self.garbage.value()},
            {"type": "heartbeat", "rank": rank},
            {"type": "rank_table_query"},
            {"type": r.choice(HEADER_TYPES)},
        ])
        header = {"v": VERSION, **header}
        for _ in range(r.randint(0, 2)):
            key = r.choice(["v", "type", "rank", "pid", "replaces_pid", "signature", "extra"])
            if key in ("pid", "replaces_pid"):
                header[key] = self.pid()
            elif r.random() < 0.3:
                header.pop(key, None)
            else:
                header[key] = r.choice([self.garbage.value(), 2, "agent_register", "rank_table_query"])
        frames = [packb(header)]
        if r.random() < 0.1:
            frames.append(self.garbage.blob())
        if r.random() < 0.05:
            frames[0] = frames[0][: r.randrange(len(frames[0]))]
        return frames


def expected_agent_reply(frames: list[bytes]) -> str | None:
    """The worker answers a 2-frame AGENT_REGISTER whose fields have their types (with AGENT_REJECTED, while it
    serves), a readable RANK_TABLE_QUERY (with RANK_TABLE) and an agent HEARTBEAT with an int rank from an identity
    it does not know (with AGENT_SHUTDOWN); everything else is dropped (PROTOCOL.md 1.3, 4.3, 4.4)."""
    if len(frames) != 1:
        return None
    try:
        header, _ = read_header(frames[0])
    except Malformed:
        return "maybe"
    if header is None:
        return None
    if header["type"] == "rank_table_query":
        return "rank_table"
    if header["type"] == "agent_register" and register_fields_valid(header):
        return "agent_rejected"
    if header["type"] == "heartbeat" and is_int(header.get("rank")):
        return "agent_shutdown"  # a heartbeat naming a rank from an unknown agent: "start again and register"
    if header["type"] == "launcher_hello" and isinstance(header.get("host"), str) and is_int(header.get("pid")) \
            and (header.get("ranks", []) == [] or (isinstance(header.get("ranks"), list)
                                                   and all(is_int(r) for r in header["ranks"]))):
        return "launcher"  # no reply of its own, but the worker heartbeats a launcher from now on
    return None


def register_fields_valid(header: dict) -> bool:
    """AGENT_REGISTER's field types, as PROTOCOL.md's message reference lists them."""
    return (is_int(header.get("rank")) and isinstance(header.get("host"), str) and is_int(header.get("pid"))
            and isinstance(header.get("model_file"), str) and isinstance(header.get("publish_address"), str)
            and (header.get("replaces_pid") is None or is_int(header.get("replaces_pid")))
            and "shard" not in header)


def check_broker_reply(expect: Expectations, frames: list[bytes]) -> None:
    header, _ = read_header(frames[0])
    if header is None or header["type"] not in ("reply", "error", "metadata", "status"):
        expect.problems.append(f"unreadable reply {frames[0][:80]!r}")
        return
    key = id_key(header.get("id"))
    expect.replies[key] += 1
    if header["type"] == "error":
        code = header.get("code")
        expect.codes[code] += 1
        if code not in ("INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                        "INTERNAL", "CANCELLED") or not isinstance(header.get("message"), str):
            expect.problems.append(f"error without a known code and message: {header}")
    else:
        expect.codes["OK" if header["type"] == "reply" else "METADATA"] += 1  # a readable METADATA_QUERY's answer
    if key in expect.valid:
        x = expect.valid.pop(key)
        if header["type"] != "reply" or len(frames) != 2:
            expect.problems.append(f"valid request {header.get('id')!r} answered {header}")
            return
        y = np.frombuffer(frames[1], np.float32).reshape(128, 16)
        if not np.allclose(y, matmul_reference(x), atol=1e-5):
            expect.problems.append(f"valid request {header.get('id')!r}: wrong result")
        else:
            expect.valid_ok += 1


def test_fuzzed_routers_answer_once_and_keep_serving(cluster: LocalCluster) -> None:
    rng = random.Random(SEED)
    agents_before = set(agent_pids(cluster.processes["agents"].pid))
    assert len(agents_before) == 2
    broker_fuzzer = BrokerFuzzer(rng)
    agent_fuzzer = AgentFuzzer(rng, agents_before)
    context = zmq.Context.instance()
    broker_sockets = [context.socket(zmq.DEALER) for _ in range(4)]
    agent_sockets = [context.socket(zmq.DEALER) for _ in range(2)]
    poller = zmq.Poller()
    for sock in broker_sockets:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cluster.client_address)
        poller.register(sock, zmq.POLLIN)
    for sock in agent_sockets:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{cluster.distributed_address}")
        poller.register(sock, zmq.POLLIN)

    broker_expect = Expectations()
    outstanding = Counter()
    agent_expected, agent_replies = Counter(), Counter()
    sent_broker = sent_agent = 0
    started = time.monotonic()
    try:
        while sent_broker < BROKER_MESSAGES or sent_agent < AGENT_MESSAGES or sum(outstanding.values()) > 0 \
                or sum(n for kind, n in agent_expected.items() if kind not in ("maybe", "launcher")) \
                > sum(n for kind, n in agent_replies.items() if kind != "heartbeat"):
            assert time.monotonic() - started < FUZZ_DEADLINE_S, (
                f"not every message answered after {FUZZ_DEADLINE_S} s: sent {sent_broker}, "
                f"missing {broker_expect.ids - broker_expect.replies}, agent replies {agent_replies} of "
                f"{agent_expected}\n{cluster.log_tails()}")
            index = sent_broker % len(broker_sockets)
            sent_now = sent_broker < BROKER_MESSAGES and outstanding[index] < WINDOW
            if sent_now:
                sock = broker_sockets[index]
                if sent_broker % VALID_EVERY == 0:
                    request_id = f"valid-{sent_broker}"
                    header, frames, x = broker_fuzzer.valid(request_id)
                    broker_expect.valid[id_key(request_id)] = x
                    message = [packb(header), *frames]
                else:
                    message = broker_fuzzer.message()
                try:
                    header, request_id = read_header(message[0])
                    answered = not is_cancel(header)
                    if answered:
                        broker_expect.ids[id_key(request_id)] += 1
                except Malformed:
                    answered = True
                    broker_expect.malformed += 1
                sock.send_multipart(message)
                outstanding[index] += answered
                sent_broker += 1
            if sent_agent < AGENT_MESSAGES and sent_agent * BROKER_MESSAGES <= sent_broker * AGENT_MESSAGES:
                message = agent_fuzzer.message()
                reply = expected_agent_reply(message)
                if reply is not None:
                    agent_expected[reply] += 1
                agent_sockets[sent_agent % len(agent_sockets)].send_multipart(message)
                sent_agent += 1
            events = dict(poller.poll(timeout=0 if sent_now else 5))
            for i, sock in enumerate(broker_sockets):
                while sock in events and sock.poll(0):
                    check_broker_reply(broker_expect, sock.recv_multipart())
                    outstanding[i] -= 1
            for sock in agent_sockets:
                while sock in events and sock.poll(0):
                    header, _ = read_header(sock.recv_multipart()[-1])
                    agent_replies[header["type"] if header else "unreadable"] += 1
        elapsed = time.monotonic() - started
    finally:
        for sock in broker_sockets + agent_sockets:
            sock.close()

    assert not broker_expect.problems, broker_expect.problems[:10]
    missing, extra = broker_expect.ids - broker_expect.replies, broker_expect.replies - broker_expect.ids
    assert not missing, f"missing {missing}"
    assert sum(extra.values()) == broker_expect.malformed, (
        f"{broker_expect.malformed} malformed messages but {sum(extra.values())} replies beyond the expected ids: "
        f"{extra}")
    maybe = agent_expected.pop("maybe", 0)
    if agent_expected.pop("launcher", 0):
        agent_replies.pop("heartbeat", None)
    assert not agent_expected - agent_replies, f"agent replies {agent_replies} of {agent_expected}"
    assert sum((agent_replies - agent_expected).values()) <= maybe, (
        f"agent replies {agent_replies} beyond {agent_expected} and {maybe} malformed messages")
    assert not broker_expect.valid and broker_expect.valid_ok == BROKER_MESSAGES // VALID_EVERY
    assert broker_expect.codes["INVALID_ARGUMENT"] > BROKER_MESSAGES // 2, broker_expect.codes
    assert {"NOT_FOUND", "DEADLINE_EXCEEDED"} <= set(broker_expect.codes), broker_expect.codes
    print(f"fuzzed {sent_broker} broker + {sent_agent} agent messages in {elapsed:.1f} s; {broker_expect.codes}")

    cluster.check_alive()
    xs = np.random.default_rng(SEED).standard_normal((20, 128, 96)).astype(np.float32)
    with cluster.client() as client:
        for x in xs:
            np.testing.assert_allclose(client.infer({"x": x}, timeout=10)[0]["y"], matmul_reference(x), atol=1e-5)
    assert set(agent_pids(cluster.processes["agents"].pid)) == agents_before, "the fuzz restarted an agent"
    assert not log_events(cluster.logs["worker"], "agent_lost")


def raw_request(cluster: LocalCluster, header: dict[str, Any], frames: list[bytes]) -> dict[str, Any]:
    """One message from a raw DEALER; its one reply's header (within 10 s)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.client_address)
    try:
        sock.send_multipart([packb(header), *frames])
        assert sock.poll(10_000), f"no reply to {header}"
        reply = msgpack.unpackb(sock.recv_multipart()[0])
        assert not sock.poll(200), "a second reply"
    finally:
        sock.close()
    return reply


def assert_still_serving(cluster: LocalCluster) -> None:
    cluster.check_alive()
    with cluster.client() as client:
        try:
            client.infer(ONES, timeout=10)
        except ClientError as error:
            pytest.fail(f"not serving any more: {error}")


def test_shape_whose_size_overflows_int64_is_invalid_argument(cluster: LocalCluster) -> None:
    """[2**32, 2**32] has 2**64 elements, 0 in int64 arithmetic: an empty frame must not pass for it (it used to
    reach `reshape`, whose ValueError killed the worker)."""
    header = {"v": VERSION, "type": "request", "id": 1, "servable": "matmul", "method": "predict", "timeout_ms": 5000,
              "instances": [[{"name": "x", "dtype": "float32", "shape": [2**32, 2**32]}]]}
    reply = raw_request(cluster, header, [b""])
    assert reply["type"] == "error" and reply["code"] == "INVALID_ARGUMENT", reply
    assert_still_serving(cluster)


def test_nan_request_id_is_refused_at_once(cluster: LocalCluster) -> None:
    """NaN != NaN, so the broker could never match the worker's reply to a NaN id: the request would wait for
    its deadline (or forever, without one) although the worker answered. Ids are ints or strs (PROTOCOL.md 1.3):
    the error comes at once, with a nil id because the request's own cannot be read."""
    header, frames, _ = BrokerFuzzer(random.Random(SEED)).valid(math.nan)
    del header["timeout_ms"]
    started = time.monotonic()
    reply = raw_request(cluster, header, frames)
    assert reply["type"] == "error" and reply["code"] == "INVALID_ARGUMENT", reply
    assert reply["id"] is None and "at `$.id`" in reply["message"] and time.monotonic() - started < 5
    assert_still_serving(cluster)
