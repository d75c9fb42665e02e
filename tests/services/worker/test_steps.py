"""Continuous batching (services/worker/steps.py): slots, decode steps that merge sequences, prefills between
decode steps, releases. No sockets: published calls are collected and results fed back by hand."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from zmserve.codec import encode_values
from zmserve.metrics import WorkerMetrics
from zmserve.protocol import ErrorCode, ModelCall, ModelError, ModelResult, ModelSignature, ServingError, TensorSpec
from zmserve.protocol import decode as decode_message
from zmserve.servable import MethodSpec
from zmserve_services.worker.requests import MethodRun
from zmserve_services.worker.stage_threads import CallWanted, RunEnded
from zmserve_services.worker.steps import Steps

SUBGRAPHS = [ModelSignature(inputs=[TensorSpec("tokens", "int32", [-1, -1]), TensorSpec("positions", "int32", [-1])],
                            outputs=[TensorSpec("logits", "float32", [-1, 5])], stateful=True),
             ModelSignature(inputs=[TensorSpec("tokens", "int32", [-1, 1]), TensorSpec("positions", "int32", [-1])],
                            outputs=[TensorSpec("logits", "float32", [-1, 5])], stateful=True)]
METHOD = MethodSpec("generate", ("prompt",), ("tokens",), (), ())
ids = itertools.count(1)


def new_steps(max_sequences: int = 4, step_wait: float = 60.0) -> tuple[Steps, list[ModelCall]]:
    published: list[ModelCall] = []
    steps = Steps(lambda frames: published.append(decode_message(frames[0], ModelCall)), itertools.count(1),
                  WorkerMetrics("", 0, enabled=False), max_sequences, step_wait, with_batch_dim=False)
    steps.start(SUBGRAPHS)
    return steps, published


def new_run(steps: Steps) -> MethodRun:
    run = MethodRun(b"client", next(ids), "gpt", METHOD, [{}], None)
    steps.reserve(run)
    return run


def want(steps: Steps, run: MethodRun, subgraph: int, tokens: list[int], position: int = 0) -> CallWanted:
    wanted = CallWanted(run, subgraph, [np.array([tokens], np.int32), np.array([position], np.int32)])
    steps.computing.discard(run)  # as the loop does when a stage thread calls
    steps.want(wanted)
    return wanted


def answer(steps: Steps, call: ModelCall, logits: np.ndarray) -> None:
    specs, frames = encode_values({"logits": logits})
    assert steps.take_result(ModelResult(call=call.call, rank=0, values=specs), frames)


def test_a_full_server_refuses_the_next_sequence_at_once() -> None:
    steps, _ = new_steps(max_sequences=2)
    new_run(steps), new_run(steps)
    with pytest.raises(ServingError) as full:
        new_run(steps)
    assert full.value.code == ErrorCode.RESOURCE_EXHAUSTED


def test_waiting_decode_calls_leave_as_one_step_and_each_gets_its_row() -> None:
    steps, published = new_steps()
    runs = [new_run(steps) for _ in range(3)]
    for run in runs:  # prefills go one at a time
        want(steps, run, 0, [1, 2])
        steps.pump()
        answer(steps, published[-1], np.zeros((1, 5), np.float32))
    assert [(c.subgraph, c.sequences) for c in published] == [(0, [steps.slots[r]]) for r in runs]
    wanted = [want(steps, run, 1, [i], 2) for i, run in enumerate(runs)]
    steps.pump()
    step = published[-1]
    assert step.subgraph == 1 and step.sequences == [steps.slots[r] for r in runs]
    answer(steps, step, np.arange(15, dtype=np.float32).reshape(3, 5))
    for i, w in enumerate(wanted):
        (logits,) = w.future.result(timeout=1)
        assert logits.shape == (1, 5) and logits[0, 0] == 5 * i


def test_a_decode_step_waits_for_a_sequence_still_computing_its_token() -> None:
    steps, published = new_steps()
    first, second = new_run(steps), new_run(steps)
    want(steps, first, 1, [1], 3)
    steps.computing.add(second)  # second holds a slot and runs Python: it will join this step
    steps.pump()
    assert published == []
    want(steps, second, 1, [2], 3)
    steps.pump()
    assert published[-1].sequences == [steps.slots[first], steps.slots[second]]


def test_one_prefill_chunk_at_most_between_two_decode_steps() -> None:
    steps, published = new_steps()
    decoding, prompt_a, prompt_b = new_run(steps), new_run(steps), new_run(steps)
    want(steps, decoding, 1, [1], 4)
    want(steps, prompt_a, 0, [1, 2, 3])
    want(steps, prompt_b, 0, [4, 5])
    by_sequence = {steps.slots[run]: run for run in (decoding, prompt_a, prompt_b)}
    order = []
    for _ in range(4):
        steps.pump()
        call = published[-1]
        order.append((call.subgraph, call.sequences))
        answer(steps, call, np.zeros((len(call.sequences), 5), np.float32))
        for sequence in call.sequences:  # every sequence served calls again with its next token
            want(steps, by_sequence[sequence], 1, [1], 5)
    a, b, d = (steps.slots[run] for run in (prompt_a, prompt_b, decoding))
    assert order == [(0, [a]), (1, [d, a]), (0, [b]), (1, [d, a, b])]


def test_an_ended_request_unwinds_its_thread_and_its_sequence_is_released_once() -> None:
    steps, published = new_steps()
    run, other = new_run(steps), new_run(steps)
    want(steps, run, 0, [1])
    steps.pump()
    answer(steps, published[-1], np.zeros((1, 5), np.float32))
    waiting = want(steps, run, 1, [1], 1)
    sequence = steps.slots[run]
    run.finished = True
    steps.end(run)
    with pytest.raises(RunEnded):
        waiting.future.result(timeout=1)
    assert run not in steps.slots
    steps.pump()  # nothing else to send: a call that only releases
    assert (published[-1].values, published[-1].release) == ([], [sequence])
    steps.end(other)  # never reached the agents: nothing to release
    assert steps.releases == [] and steps.slots == {}


def test_a_model_error_reaches_every_row_of_the_step() -> None:
    steps, published = new_steps()
    runs = [new_run(steps) for _ in range(2)]
    wanted = [want(steps, run, 1, [1], 0) for run in runs]
    steps.pump()
    assert steps.take_result(ModelError(call=published[-1].call, rank=0, code=ErrorCode.INTERNAL, message="x"), [])
    for w in wanted:
        with pytest.raises(ServingError, match="rank 0: x"):
            w.future.result(timeout=1)


def test_a_call_that_does_not_fit_the_subgraph_is_refused_before_it_leaves() -> None:
    steps, published = new_steps()
    run = new_run(steps)
    bad: list[Any] = [np.array([[1, 2]], np.int32), np.array([0], np.int32)]  # subgraph 1 takes one token
    with pytest.raises(ServingError) as refused:
        steps.want(CallWanted(run, 1, bad))
    assert refused.value.code == ErrorCode.INVALID_ARGUMENT
    with pytest.raises(ServingError, match="2 subgraphs"):
        steps.want(CallWanted(run, 2, bad))
    assert published == []


def test_sequences_handed_a_result_are_waited_for_in_the_next_step() -> None:
    steps, published = new_steps()
    first, second = new_run(steps), new_run(steps)
    want(steps, first, 1, [1], 3), want(steps, second, 1, [2], 3)
    steps.pump()
    answer(steps, published[-1], np.zeros((2, 5), np.float32))
    assert steps.computing == {first, second}  # both threads now compute their next token
    want(steps, first, 1, [3], 4)
    steps.pump()
    assert len(published) == 1
    want(steps, second, 1, [4], 4)
    steps.pump()
    assert published[-1].sequences == [steps.slots[first], steps.slots[second]]


def test_each_instance_of_a_request_is_a_sequence_of_its_own() -> None:
    steps, published = new_steps()
    run = new_run(steps)
    want(steps, run, 0, [1, 2])
    steps.pump()
    first = published[-1].sequences
    answer(steps, published[-1], np.zeros((1, 5), np.float32))
    steps.computing.discard(run)
    steps.want(CallWanted(run, 0, [np.array([[3]], np.int32), np.array([0], np.int32)], instance=1))
    steps.pump()
    assert published[-1].release == first and published[-1].sequences != first
    assert len(steps.slots) == 1
