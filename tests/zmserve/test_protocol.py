"""Typed messages: every type round-trips, every malformed header is INVALID_ARGUMENT with a message that says
what is wrong, and docs/PROTOCOL.md's message reference is what the types say."""

from pathlib import Path

import msgpack
import msgspec
import pytest

from zmserve import protocol_doc
from zmserve.endpoints import endpoint_host_port, normalize_address
from zmserve.protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    AgentConfigure,
    AgentRegister,
    ErrorCode,
    Forward,
    MessageType,
    Reply,
    Request,
    ServingError,
    ShardInfo,
    TensorSpec,
    decode,
    encode,
    parse_subscription,
    peek_request_id,
    subscription_topic,
)

REPO = Path(__file__).resolve().parents[2]


def test_every_message_type_has_one_struct_and_round_trips() -> None:
    tags = {m.__struct_config__.tag for m in MESSAGE_TYPES}
    assert tags == {t.value for t in MessageType}
    for message_type in MESSAGE_TYPES:
        required = {f.name: _example(f.type) for f in msgspec.structs.fields(message_type) if f.required}
        message = message_type(**required)
        assert decode(encode(message)) == message


def _example(annotation: object) -> object:
    if getattr(annotation, "__origin__", None) is list:
        return []
    examples = {int: 1, str: "s", bool: True, float: 1.5, ErrorCode: ErrorCode.INTERNAL, Forward: Forward.NONE}
    for candidate, value in examples.items():
        if annotation == candidate or (hasattr(annotation, "__args__") and candidate in annotation.__args__):
            return value
    return None


def test_header_is_a_map_with_version_and_type() -> None:
    frame = encode(Request(id=9, servable="s", method="m", instances=[[TensorSpec("x", "float32", [2])]]))
    document = msgpack.unpackb(frame)
    assert document["v"] == PROTOCOL_VERSION and document["type"] == "request"
    assert document["instances"] == [[{"name": "x", "dtype": "float32", "shape": [2]}]]


@pytest.mark.parametrize(
    ("frame", "fragment"),
    [
        (b"\xc1garbage", "malformed header"),
        (msgpack.packb([1, 2]), "malformed header"),
        (msgpack.packb({"v": PROTOCOL_VERSION + 1, "type": "request"}), "unsupported protocol version"),
        (msgpack.packb({"v": PROTOCOL_VERSION, "type": "gossip"}), "Invalid value 'gossip'"),
        (msgpack.packb({"v": PROTOCOL_VERSION, "type": "request", "id": 1, "method": "m"}),
         "missing required field `servable`"),
        (msgpack.packb({"v": PROTOCOL_VERSION, "type": "request", "id": [1], "servable": "s", "method": "m"}),
         "Expected `int | str`, got `array` - at `$.id`"),
        (b"\x91" * 3000 + b"\x00", "malformed header"),
    ],
)
def test_bad_headers_are_invalid_argument(frame: bytes, fragment: str) -> None:
    with pytest.raises(ServingError) as caught:
        decode(frame)
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT and fragment in caught.value.message


def test_a_message_not_carried_by_the_link_is_refused() -> None:
    with pytest.raises(ServingError, match="Reply is not accepted here; expected Request"):
        decode(encode(Reply(id=1)), Request)


def test_id_of_a_bad_header_is_peeked_when_it_is_an_int_or_str() -> None:
    assert peek_request_id(msgpack.packb({"v": 1, "type": "request", "id": 7})) == 7
    assert peek_request_id(msgpack.packb({"id": "a"})) == "a"
    assert peek_request_id(msgpack.packb({"id": [7]})) is None
    assert peek_request_id(msgpack.packb({"id": True})) is None
    assert peek_request_id(b"\xc1") is None
    broken = bytearray(msgpack.packb({"id": 7, "servable": "abc"}))
    broken[broken.index(b"abc")] = 0xFF  # invalid UTF-8 in another field does not hide the id
    assert peek_request_id(bytes(broken)) == 7
    assert peek_request_id(msgpack.packb({1: 2, "id": "a"})) == "a"


def test_optional_fields_take_their_defaults() -> None:
    document = {"v": PROTOCOL_VERSION, "type": "agent_register", "rank": 0, "host": "h", "pid": 1,
                "model_file": "m", "publish_address": "tcp://h:1"}
    message = decode(msgpack.packb(document), AgentRegister)
    assert message.replaces_pid is None and message.shard == ShardInfo()


def test_forward_is_an_enum_on_the_wire() -> None:
    configure = AgentConfigure(stage=0, stage_size=1, node_id=0, group_size=1, scheduler_host="h", scheduler_port=1,
                               input_address="a", result_address="r", forward=Forward.PUBLISH)
    assert msgpack.unpackb(encode(configure))["forward"] == "publish"
    bad = {**msgpack.unpackb(encode(configure)), "forward": "elsewhere"}
    with pytest.raises(ServingError, match="forward"):
        decode(msgpack.packb(bad))


def test_subscription_events() -> None:
    assert parse_subscription(b"\x01" + subscription_topic(3)) == (True, 3)
    assert parse_subscription(b"\x00" + subscription_topic(12)) == (False, 12)
    assert parse_subscription(b"\x01C") is None
    assert parse_subscription(b"\x01Rx") is None
    assert parse_subscription(b"") is None


def test_protocol_md_message_reference_matches_the_types() -> None:
    document = (REPO / "docs" / "PROTOCOL.md").read_text()
    assert protocol_doc.replace_reference(document) == document, (
        "docs/PROTOCOL.md's message reference is stale: run `python -m zmserve.protocol_doc --write "
        "docs/PROTOCOL.md`"
    )


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [("127.0.0.1:5500", "tcp://127.0.0.1:5500"), ("localhost:5500", "tcp://localhost:5500"),
     ("tcp://127.0.0.1:5500", "tcp://127.0.0.1:5500"), ("ipc:///tmp/x", "ipc:///tmp/x")],
)
def test_address_forms(address: str, endpoint: str) -> None:
    assert normalize_address(address) == endpoint


def test_host_port_split() -> None:
    assert endpoint_host_port("tcp://10.0.0.2:6200") == ("10.0.0.2", 6200)
    with pytest.raises(ValueError):
        endpoint_host_port("nohost")
