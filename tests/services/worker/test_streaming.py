"""Generator stages inside the worker (PROTOCOL.md §4.11): each yield is one PARTIAL of a streamed request, numbered
0, 1, 2, ...; the request still ends with exactly one REPLY or ERROR; a request that did not ask for a stream gets
only the REPLY; a cancelled or expired request's generator is closed at once. A real Pipeline, stepped as the
worker loop steps it; no sockets."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from zmserve.codec import decode_instances
from zmserve.protocol import Error, ErrorCode, Partial, Reply, decode
from zmserve.servable import METHOD_INPUT, DistributedModel, MethodSpec, Stage, ValueRef
from zmserve_services.worker.pipeline import Pipeline
from zmserve_services.worker.requests import MethodRun


def generator_method(function: Any, outputs: tuple[str, ...] = ("token_ids", "text"),
                     outputs_count: int | None = None) -> MethodSpec:
    """A method `generate(n) -> outputs` whose only stage is the generator `function`."""
    n = ValueRef(METHOD_INPUT, 0, "n")
    count = len(outputs) if outputs_count is None else outputs_count
    stage = Stage(function, (n,), count)
    return MethodSpec("generate", ("n",), outputs, (stage,), tuple(ValueRef(0, i, "") for i in range(count)))


def count_up(n: Any) -> Any:
    for i in range(int(n)):
        yield {"token_ids": np.array([i], np.int32), "text": f"<{i}>"}


class Loop:
    """A pipeline and what it sent: partials and answers, as the worker loop would hand them to the broker."""

    def __init__(self) -> None:
        self.partials: list[tuple[Partial, list[dict[str, Any]]]] = []
        self.answers: list[Reply | Error] = []
        self.frames: list[list[Any]] = []
        self.pipeline = Pipeline(DistributedModel(1, 1, False), 4, 16, publish=lambda frames: None,
                                 answer=self.answer, partial=self.partial)

    def answer(self, client: bytes, request_id: Any, code: str, frames: list[Any]) -> None:
        self.answers.append(decode(frames[0]))
        self.frames.append(frames)

    def partial(self, client: bytes, frames: list[Any]) -> None:
        header = decode(frames[0], Partial)
        self.partials.append((header, decode_instances(header.instances, frames[1:])))

    def run(self, method: MethodSpec, instances: list[dict[str, Any]], stream: bool = True,
            deadline: float | None = None) -> MethodRun:
        run = MethodRun.start(b"client", 7, "servable", method, instances, deadline, stream=stream)
        self.pipeline.admit(run)
        return run

    def turns(self, limit: int = 100) -> int:
        """Step the generators as the loop does, once per turn, until none is left; the turns it took."""
        for turn in range(limit):
            if not self.pipeline.generators:
                return turn
            assert self.pipeline.seconds_until_due() == 0.0, "a waiting generator keeps the loop awake"
            self.pipeline.step_generators()
        raise AssertionError("the generators never finished")

    def result(self) -> dict[str, Any]:
        assert len(self.answers) == 1 and isinstance(self.answers[0], Reply)
        return decode_instances(self.answers[0].instances, self.frames[0][1:])[0]


def test_each_yield_is_one_partial_in_order_then_the_concatenation_is_the_reply() -> None:
    loop = Loop()
    loop.run(generator_method(count_up), [{"n": np.int32(3)}])
    assert loop.answers == [] and loop.partials == [], "nothing runs before the loop steps the generator"
    assert loop.turns() == 4  # three yields, then the end
    assert [p.seq for p, _ in loop.partials] == [0, 1, 2] and {p.id for p, _ in loop.partials} == {7}
    assert [values[0]["text"] for _, values in loop.partials] == ["<0>", "<1>", "<2>"]
    assert [values[0]["token_ids"].tolist() for _, values in loop.partials] == [[0], [1], [2]]
    result = loop.result()
    assert result["text"] == "<0><1><2>" and result["token_ids"].tolist() == [0, 1, 2]


def test_a_request_that_did_not_ask_for_a_stream_gets_only_the_reply() -> None:
    loop = Loop()
    loop.run(generator_method(count_up), [{"n": np.int32(3)}], stream=False)
    loop.turns()
    assert loop.partials == []
    assert loop.result()["text"] == "<0><1><2>"


def test_the_generators_return_value_is_the_reply_and_a_tuple_names_the_first_outputs() -> None:
    def summary(n: Any) -> Any:
        yield np.array([5], np.int32), "five"
        return np.array([5, 6], np.int32), "whole answer", "length"

    loop = Loop()
    loop.run(generator_method(summary, ("token_ids", "text", "finish_reason")), [{"n": 1}])
    loop.turns()
    assert [values[0]["text"] for _, values in loop.partials] == ["five"]
    assert loop.result() == {"token_ids": pytest.approx(np.array([5, 6])), "text": "whole answer",
                             "finish_reason": "length"}


def test_instances_step_together_and_an_ended_instance_yields_nothing() -> None:
    loop = Loop()
    loop.run(generator_method(count_up), [{"n": 1}, {"n": 2}])
    loop.turns()
    assert [[v.get("text") for v in values] for _, values in loop.partials] == [["<0>", "<0>"], [None, "<1>"]]
    answer = loop.answers[0]
    assert isinstance(answer, Reply)
    results = decode_instances(answer.instances, loop.frames[0][1:])
    assert [r["text"] for r in results] == ["<0>", "<0><1>"]


def test_an_error_after_some_partials_is_the_one_answer_and_names_whose_fault() -> None:
    def breaks(n: Any) -> Any:
        yield {"text": "a"}
        raise ValueError("n is too large")

    def crashes(n: Any) -> Any:
        yield {"text": "a"}
        return {}["missing"]

    for function, code in ((breaks, ErrorCode.INVALID_ARGUMENT), (crashes, ErrorCode.INTERNAL)):
        loop = Loop()
        loop.run(generator_method(function, ("text",)), [{"n": 1}])
        loop.turns()
        assert len(loop.partials) == 1 and len(loop.answers) == 1
        error = loop.answers[0]
        assert isinstance(error, Error) and error.code == code and error.id == 7


@pytest.mark.parametrize("yielded", [{"nope": 1}, ("one", "two", "three"), 42], ids=["unknown name", "long", "int"])
def test_a_yield_that_names_no_output_is_the_servables_mistake(yielded: Any) -> None:
    def wrong(n: Any) -> Any:
        yield yielded

    loop = Loop()
    loop.run(generator_method(wrong), [{"n": 1}])
    loop.turns()
    assert loop.partials == [] and len(loop.answers) == 1
    error = loop.answers[0]
    assert isinstance(error, Error) and error.code == ErrorCode.INTERNAL and "yield" in error.message


def test_cancel_and_deadline_close_the_generator_at_once() -> None:
    closed: list[str] = []

    def endless(n: Any) -> Any:
        try:
            while True:
                yield {"text": "x"}
        finally:
            closed.append(str(n))

    loop = Loop()
    loop.run(generator_method(endless, ("text",)), [{"n": "cancelled"}])
    loop.pipeline.step_generators()
    loop.pipeline.step_generators()
    loop.pipeline.cancel(b"client", 7)
    assert closed == ["cancelled"] and not loop.pipeline.generators and loop.answers == []

    loop = Loop()
    loop.run(generator_method(endless, ("text",)), [{"n": "expired"}], deadline=time.monotonic() + 0.05)
    loop.pipeline.step_generators()
    time.sleep(0.06)  # the deadline passes, as the loop's clock sees it
    loop.pipeline.do_chores(time.monotonic())
    assert closed == ["cancelled", "expired"] and not loop.pipeline.generators
    assert len(loop.answers) == 1 and loop.answers[0].code == ErrorCode.DEADLINE_EXCEEDED
    assert [p.seq for p, _ in loop.partials] == [0]


def test_stages_after_the_generator_run_on_its_outputs() -> None:
    n = ValueRef(METHOD_INPUT, 0, "n")
    stages = (Stage(count_up, (n,), 2), Stage(lambda ids, text: text.upper(), (ValueRef(0, 0, ""),
                                                                              ValueRef(0, 1, "")), 1))
    method = MethodSpec("generate", ("n",), ("token_ids", "text"), stages, (ValueRef(0, 0, ""), ValueRef(1, 0, "")))
    loop = Loop()
    loop.run(method, [{"n": 2}])
    loop.turns()
    assert loop.result()["text"] == "<0><1>".upper()
