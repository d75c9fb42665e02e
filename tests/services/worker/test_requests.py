"""Python stages inside the worker: an input the stage refuses is the caller's fault (INVALID_ARGUMENT with the
stage's words), anything else the stage raises is the servable's (INTERNAL, logged with its traceback)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import structlog

from services.worker.pipeline import Pipeline
from services.worker.requests import MethodRun
from zmserve.protocol import Error, ErrorCode, Reply, decode
from zmserve.servable import METHOD_INPUT, DistributedModel, InvalidInput, MethodSpec, Stage, ValueRef
from zmserve.server import InvalidInput as PublicInvalidInput


def one_stage_method(function: Any) -> MethodSpec:
    """A method `f(x) -> y` whose only stage is `function`, run in the worker."""
    x = ValueRef(METHOD_INPUT, 0, "x")
    return MethodSpec("f", ("x",), ("y",), (Stage(function, (x,), 1),), (ValueRef(0, 0, ""),))


def answer_of(function: Any, instances: list[dict[str, Any]]) -> Reply | Error:
    answers: list[list[Any]] = []
    pipeline = Pipeline(DistributedModel(1, 1, False), 4, 16, publish=lambda frames: None,
                        answer=lambda client, frames: answers.append(frames))
    pipeline.admit(MethodRun.start(b"client", 7, "servable", one_stage_method(function), instances, None))
    assert len(answers) == 1, "exactly one answer per request"
    return decode(answers[0][0], Reply, Error)


def needs_text(text: Any) -> str:
    if not isinstance(text, str):
        raise InvalidInput(f"text must be a string, got {type(text).__name__}")
    return text.upper()


def parses_int(text: Any) -> int:
    return int(text)  # ValueError on "abc"


def adds_one(value: Any) -> Any:
    return value + 1  # TypeError on a str


def looks_up(value: Any) -> Any:
    return {}["missing"]  # KeyError: a bug in the servable


def test_invalid_input_is_the_public_name() -> None:
    assert PublicInvalidInput is InvalidInput and issubclass(InvalidInput, ValueError)


@pytest.mark.parametrize(("function", "value", "words"), [
    (needs_text, np.int64(3), "text must be a string, got int64"),
    (parses_int, "abc", "invalid literal for int() with base 10: 'abc'"),
    (adds_one, "a", 'can only concatenate str (not "int") to str'),
], ids=["InvalidInput", "ValueError", "TypeError"])
def test_a_stage_refusing_its_input_answers_invalid_argument(function: Any, value: Any, words: str) -> None:
    with structlog.testing.capture_logs() as logs:
        answer = answer_of(function, [{"x": "fine"}, {"x": value}] if function is needs_text else [{"x": value}])
    assert isinstance(answer, Error) and answer.id == 7
    assert answer.code == ErrorCode.INVALID_ARGUMENT
    index = 1 if function is needs_text else 0
    assert answer.message == f"instance {index}: stage {function.__name__!r} rejected its input: {words}"
    assert not [entry for entry in logs if entry["event"] == "stage_crashed"], "the caller's error is no crash"


def test_any_other_exception_is_internal_and_logged_with_its_traceback() -> None:
    with structlog.testing.capture_logs() as logs:
        answer = answer_of(looks_up, [{"x": 1}])
    assert isinstance(answer, Error)
    assert answer.code == ErrorCode.INTERNAL
    assert answer.message == "instance 0: stage 'looks_up' raised KeyError: 'missing'"
    crashed = [entry for entry in logs if entry["event"] == "stage_crashed"]
    assert len(crashed) == 1 and crashed[0]["stage"] == "looks_up" and crashed[0]["request_id"] == 7
    assert crashed[0]["exc_info"] is True and crashed[0]["log_level"] == "error"


def test_a_stage_that_accepts_its_input_answers_its_result() -> None:
    answer = answer_of(needs_text, [{"x": "abc"}])
    assert isinstance(answer, Reply) and answer.id == 7 and len(answer.instances) == 1
