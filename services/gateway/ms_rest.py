"""MindSpore Serving's RESTful scheme: `POST /model/{servable}[/version/{n}]:{method}` with
`{"instances": [{"input": value, ...}, ...]}`, answered `{"instances": [{"output": value, ...}, ...]}`.

Errors are `{"error_msg": "..."}`: for the whole request, or in place of one instance's outputs when only that
instance failed, exactly where MindSpore Serving puts them, and with its message text wherever the gateway finds
the error itself (the URL and the body). Unlike MindSpore Serving, which answers every error with HTTP 200, the
status says whose fault it is (`errors.http_status`).

Each instance is its own broker request, sent together and awaited together: one instance's failure is that
instance's `error_msg`, as in MindSpore Serving, and the worker still batches them (it batches across requests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from zmserve.codec import Instance
from zmserve.protocol import ErrorCode, ServingError
from zmserve_services.gateway.errors import http_status
from zmserve_services.gateway.values import invalid, ms_reply_value, ms_value

PREFIX = "/model/"
MAX_VERSION = 2**32 - 1
PARSE_FAILED = "Parser request failed, "
"""MindSpore Serving's prefix for every complaint about the body's instances."""
WHOLE_REQUEST_CODES = frozenset({ErrorCode.NOT_FOUND, ErrorCode.UNAVAILABLE, ErrorCode.RESOURCE_EXHAUSTED,
                                 ErrorCode.DEADLINE_EXCEEDED})
"""Failures of the request rather than of one instance: when every instance has the same one, it is answered once
for the request, as MindSpore Serving answers an unknown servable."""


@dataclass(frozen=True)
class Target:
    servable: str
    version: int
    """0 = the newest version that has a ready worker (the broker's rule)."""
    method: str


def parse_path(path: str) -> Target:
    """`/model/{servable}[/version/{n}]:{method}` (the caller has checked the prefix)."""
    head, colon, method = path[len(PREFIX):].partition(":")
    if not colon or not method:
        raise invalid("please check url, the keyword:[service method] must contain.")
    servable, slash, rest = head.partition("/")
    if not servable:
        raise invalid("please check url, the keyword:[model] must contain.")
    if not slash:
        return Target(servable, 0, method)
    keyword, _, number = rest.partition("/")
    if keyword != "version":
        raise invalid(f"please check url: expected /model/{{servable}}[/version/{{n}}]:{{method}}, got {path}")
    try:
        version = int(number)
    except ValueError:
        raise invalid(f"please check url, the keyword:[version] value invalid, request version number {number}") \
            from None
    if not 0 <= version < MAX_VERSION:
        raise invalid(f"please check url, version number range failed, request version number {number}")
    return Target(servable, version, method)


def parse_body(body: bytes) -> list[Instance]:
    """The instances of a request body, each a dict of input name -> zmserve value."""
    if not body:
        raise invalid("http message invalid")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise invalid(f"Illegal JSON format.{error}") from None
    try:
        return [_instance(item) for item in _instance_list(document)]
    except ServingError as error:
        raise invalid(PARSE_FAILED + error.message) from None


def _instance_list(document: Any) -> list[Any]:
    if not isinstance(document, dict) or "instances" not in document:
        raise invalid("key 'instances' expects to exist once, but actually 0 times")
    instances = document["instances"]
    if isinstance(instances, dict):  # {"instances": {"x": 1}} is one instance
        if not instances:
            raise invalid("json object, value is empty")
        return [instances]
    if not isinstance(instances, list):
        raise invalid("instances no key mode is not supported")
    if not instances:
        raise invalid("instances value is array type, but no value")
    if not isinstance(instances[0], dict):
        raise invalid("instances no key mode is not supported")
    return instances


def _instance(item: Any) -> Instance:
    if not isinstance(item, dict):
        raise invalid("json array, instance is not object type")
    if not item:
        raise invalid("json array, instance is object type, but no value")
    values: Instance = {}
    for name in sorted(item):  # MindSpore Serving reads inputs in name order: its first complaint is the same
        if not name:
            raise invalid("string key is empty")
        values[name] = ms_value(item[name])
    return values


def reply(outcomes: list[Instance | ServingError]) -> tuple[int, bytes]:
    """The status and body for every instance's outcome (its outputs, or its error)."""
    errors = [outcome for outcome in outcomes if isinstance(outcome, ServingError)]
    if not errors:
        return 200, _dumps({"instances": [_outputs(outcome) for outcome in outcomes]})
    first = errors[0]
    same_everywhere = len(errors) == len(outcomes) and all(
        (e.code, e.message) == (first.code, first.message) for e in errors)
    if len(outcomes) == 1 or (same_everywhere and first.code in WHOLE_REQUEST_CODES):
        return http_status(first.code), error_body(first.message)
    status = 200 if len(errors) < len(outcomes) else http_status(first.code)
    return status, _dumps({"instances": [{"error_msg": outcome.message} if isinstance(outcome, ServingError)
                                         else _outputs(outcome) for outcome in outcomes]})


def error_body(message: str) -> bytes:
    return orjson.dumps({"error_msg": message})


def _outputs(outputs: Instance) -> dict[str, Any]:
    return {name: ms_reply_value(value) for name, value in outputs.items()}


def _dumps(document: Any) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
