"""Python stages inside the worker: an input the stage refuses is the caller's fault (INVALID_ARGUMENT with the
stage's words), anything else the stage raises is the servable's (INTERNAL, logged with its traceback)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import structlog

from zmserve.codec import decode_values, encode_values
from zmserve.protocol import Error, ErrorCode, ModelResult, ModelSignature, Reply, TensorSpec, decode
from zmserve.protocol import ModelCall as ModelCallMessage
from zmserve.servable import METHOD_INPUT, DistributedModel, InvalidInput, MethodSpec, Stage, ValueRef
from zmserve.server import InvalidInput as PublicInvalidInput
from zmserve_services.worker.pipeline import Pipeline
from zmserve_services.worker.requests import MethodRun


def one_stage_method(function: Any) -> MethodSpec:
    """A method `f(x) -> y` whose only stage is `function`, run in the worker."""
    x = ValueRef(METHOD_INPUT, 0, "x")
    return MethodSpec("f", ("x",), ("y",), (Stage(function, (x,), 1),), (ValueRef(0, 0, ""),))


def answer_of(function: Any, instances: list[dict[str, Any]]) -> Reply | Error:
    answers: list[list[Any]] = []
    pipeline = Pipeline(DistributedModel(1, 1, False), 4, 16, publish=lambda frames: None,
                        answer=lambda client, request_id, code, frames: answers.append(frames))
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


# ---- cancellation ---------------------------------------------------------------------------------------------
class Agents:
    """Stands in for the agents behind a pipeline: keeps what was published, answers a call with its inputs + 1."""

    def __init__(self, batched: bool, max_inflight_calls: int = 1) -> None:
        self.published: list[ModelCallMessage] = []
        self.answers: dict[Any, Reply | Error] = {}
        self.pipeline = Pipeline(DistributedModel(1, 1, batched), max_inflight_calls, 64, publish=self.publish,
                                 answer=self.answer)
        shape = [-1, 2] if batched else [2]
        self.pipeline.start(ModelSignature(inputs=[TensorSpec("x", "float32", shape)]), max_batch_size=4,
                            max_batch_delay=60.0)

    def publish(self, frames: list[Any]) -> None:
        self.published.append(decode(frames[0], ModelCallMessage))
        self.inputs = decode_values(self.published[-1].values, frames[1:])

    def answer(self, client: bytes, request_id: Any, code: str, frames: list[Any]) -> None:
        message = decode(frames[0], Reply, Error)
        assert message.id not in self.answers, "one answer per request"
        self.answers[message.id] = message

    def admit(self, request_id: int) -> None:
        x = ValueRef(METHOD_INPUT, 0, "x")
        method = MethodSpec("f", ("x",), ("y",), (Stage(None, (x,), 1),), (ValueRef(0, 0, ""),))
        self.pipeline.admit(MethodRun.start(b"client", request_id, "s", method,
                                            [{"x": np.full(2, request_id, np.float32)}], None))

    def finish(self, call: ModelCallMessage) -> None:
        specs, frames = encode_values({"input0": self.inputs["input0"] + 1})
        self.pipeline.take_result(ModelResult(call=call.call, rank=0, values=specs), frames)


def test_cancelled_requests_queued_in_the_worker_never_reach_the_agents() -> None:
    agents = Agents(batched=False)
    for request_id in range(1, 6):
        agents.admit(request_id)
    assert [c.request_id for c in agents.published] == [1], "one call in flight at a time"
    with structlog.testing.capture_logs() as logs:
        for request_id in (2, 3, 4):
            agents.pipeline.cancel(b"client", request_id)
        agents.pipeline.cancel(b"client", 99)  # unknown (answered already): nothing happens
    assert [(e["request_id"], e["reached_agents"]) for e in logs if e["event"] == "request_cancelled"] == \
        [(2, False), (3, False), (4, False)]
    agents.finish(agents.published[0])
    assert [c.request_id for c in agents.published] == [1, 5], "the cancelled calls were skipped"
    agents.finish(agents.published[1])
    assert sorted(agents.answers) == [1, 5] and len(agents.pipeline.table) == 0
    assert not agents.pipeline.table.calls and not agents.pipeline.table.queued_calls


def test_a_cancelled_request_already_with_the_agents_finishes_and_its_result_is_discarded() -> None:
    agents = Agents(batched=False)
    agents.admit(1)
    agents.admit(2)
    with structlog.testing.capture_logs() as logs:
        agents.pipeline.cancel(b"client", 1)
    assert [(e["request_id"], e["reached_agents"]) for e in logs if e["event"] == "request_cancelled"] == [(1, True)]
    agents.finish(agents.published[0])
    assert 1 not in agents.answers, "the broker answered it CANCELLED; the worker stays silent"
    assert [c.request_id for c in agents.published] == [1, 2], "the pipeline moves on to the next request"
    agents.finish(agents.published[1])
    assert list(agents.answers) == [2] and isinstance(agents.answers[2], Reply)


def test_cancelled_rows_leave_the_batch_before_it_is_sent() -> None:
    agents = Agents(batched=True)
    agents.admit(1)  # the pipeline was idle: sent at once, alone
    for request_id in (2, 3, 4):
        agents.admit(request_id)  # wait for company behind call 1
    agents.pipeline.cancel(b"client", 3)
    agents.finish(agents.published[0])
    agents.pipeline.do_chores(time.monotonic())  # idle again: the waiting rows leave as one batch
    assert len(agents.published) == 2
    np.testing.assert_array_equal(agents.inputs["input0"][:, 0], [2, 4])
    agents.finish(agents.published[1])
    assert sorted(agents.answers) == [1, 2, 4]
