"""Requests inside the worker: each one replays its method's stages over its instances.

A `MethodRun` walks the method's stages in order. Python stages run at once, per instance. At the model stage
each instance becomes a row of a `HeldCall` (sent as a ModelCall message): one call per instance, or, when the
model has a batch dimension, rows of a batch that the `Batcher` fills with instances of any request. The run
waits until every instance's outputs are back, then walks on. `RunTable` holds runs by request id and calls by
call id; `pipeline.Pipeline` moves them.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zmserve.codec import Instance, Value, dtype_name
from zmserve.logs import get_logger
from zmserve.protocol import ErrorCode, ServingError, TensorSpec
from zmserve.servable import METHOD_INPUT, InvalidInput, MethodSpec, Stage, ValueRef

log = get_logger("worker")

INPUT_ERRORS = (InvalidInput, TypeError, ValueError)
"""What a Python stage raises when the request's input is wrong (InvalidInput is a ValueError; named for clarity)."""


@dataclass(eq=False)
class HeldCall:
    """One call of the distributed model: its inputs (a batch when the model has a batch dimension) and, per
    row, the (run, instance) it belongs to. Rows past `len(slots)` are padding."""

    call_id: int
    inputs: list[np.ndarray]
    slots: list[tuple[MethodRun, int]]
    batched: bool
    published: float = 0.0
    """perf_counter() when it left for stage 0 (metrics)."""

    @property
    def alive(self) -> bool:
        """False once every run it serves has been answered (failed or expired): no point running it."""
        return any(not run.finished for run, _ in self.slots)


@dataclass(eq=False)
class MethodRun:
    """The state of one request: its values so far, the stage it is at, how many model outputs it awaits."""

    client: bytes
    request_id: Any
    servable: str
    method: MethodSpec
    values: list[dict[ValueRef, Value]]
    deadline: float | None
    stage_index: int = 0
    awaiting: int = 0
    finished: bool = False
    started: float = field(default_factory=time.perf_counter)
    model_queued: float = 0.0
    """perf_counter() when it arrived and when it reached the model stage (metrics)."""
    reached_model: bool = False
    """A model call of it was published: the broker is told (REQUESTS_STARTED) and never sends it elsewhere."""
    first_token: float | None = None
    last_token: float | None = None
    """perf_counter() of its first and latest stateful model result (generation metrics: TTFT, inter-token)."""
    stream: bool = False
    """The client asked for partial answers (`Request.stream`): what a generator stage yields is sent as PARTIAL."""
    partials_sent: int = 0
    """The `seq` of its next PARTIAL."""
    trace: list | None = None
    """A traced request's (hop, ns) stamps so far (zmserve/trace.py); None when it is not traced."""

    @classmethod
    def start(cls, client: bytes, request_id: Any, servable: str, method: MethodSpec,
              instances: list[Instance], deadline: float | None, stream: bool = False) -> MethodRun:
        if not instances:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, "a request needs at least one instance")
        values = []
        for index, instance in enumerate(instances):
            names = set(instance)
            if not set(method.input_names) - set(method.defaults) <= names <= set(method.input_names):
                optional = f" ({sorted(method.defaults)} optional)" if method.defaults else ""
                raise ServingError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"instance {index}: method {method.name!r} takes inputs {list(method.input_names)}{optional}, "
                    f"got {sorted(names)}",
                )
            values.append({ValueRef(METHOD_INPUT, i, n): instance[n] if n in instance else method.defaults[n]
                           for i, n in enumerate(method.input_names)})
        return cls(client, request_id, servable, method, values, deadline, stream=stream)

    @property
    def current_stage(self) -> Stage | None:
        stages = self.method.stages
        return stages[self.stage_index] if self.stage_index < len(stages) else None

    def run_python_stage(self, stage: Stage) -> None:
        """Run a Python stage for every instance and keep its outputs (errors: `stage_failure`)."""
        assert stage.function is not None
        for index in range(len(self.values)):
            try:
                returned = stage.function(*self.stage_inputs(stage, index))
            except Exception as exc:
                raise stage_failure(exc, self.request_id, stage, index) from None
            self.keep_outputs(index, stage_outputs(stage, returned))
        self.stage_index += 1

    def stage_inputs(self, stage: Stage, instance_index: int) -> list[Value]:
        """A stage's inputs for one instance."""
        return [self.values[instance_index][ref] for ref in stage.inputs]

    def keep_outputs(self, instance_index: int, outputs: tuple[Value, ...] | list[Value]) -> None:
        for i, output in enumerate(outputs):
            self.values[instance_index][ValueRef(self.stage_index, i, "")] = output

    def model_inputs(self, stage: Stage) -> list[list[Value]]:
        """The model stage's inputs, one list per instance."""
        return [[values[ref] for ref in stage.inputs] for values in self.values]

    def finish_model_call(self, instance_index: int, outputs: list[np.ndarray]) -> None:
        """Keep one instance's model outputs; the run moves on when the last awaited instance is in."""
        stage = self.current_stage
        assert stage is not None and stage.is_model
        if len(outputs) != stage.outputs_count:
            raise ServingError(
                ErrorCode.INTERNAL,
                f"the model returned {len(outputs)} outputs, method {self.method.name!r} expects "
                f"{stage.outputs_count}",
            )
        self.keep_outputs(instance_index, outputs)
        self.awaiting -= 1
        if self.awaiting == 0:
            self.stage_index += 1

    def results(self) -> list[Instance]:
        return [
            {name: values[ref] for name, ref in zip(self.method.output_names, self.method.outputs, strict=True)}
            for values in self.values
        ]


def stage_failure(exc: Exception, request_id: Any, stage: Stage, index: int) -> ServingError:
    """What a Python stage's exception answers. A stage that refuses its input (InvalidInput, TypeError,
    ValueError) is the caller's fault: INVALID_ARGUMENT with the stage's message. Anything else it raises is the
    servable's: INTERNAL, logged with its traceback. A ServingError (from zmserve's own calls inside the stage)
    keeps its code. Called inside the `except` block, so the log line carries the traceback."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, INPUT_ERRORS):
        return ServingError(ErrorCode.INVALID_ARGUMENT, f"instance {index}: stage {stage.label!r} rejected its input: "
                                                        f"{exc}")
    log.exception("stage_crashed", request_id=request_id, stage=stage.label, instance=index)
    return ServingError(ErrorCode.INTERNAL,
                        f"instance {index}: stage {stage.label!r} raised {type(exc).__name__}: {exc}")


def stage_outputs(stage: Stage, returned: Any) -> tuple[Value, ...] | list[Value]:
    """A Python stage's return value as its `outputs_count` outputs; any other shape is the servable's mistake."""
    outputs = returned if stage.outputs_count > 1 else (returned,)
    if not isinstance(outputs, tuple | list) or len(outputs) != stage.outputs_count:
        raise ServingError(
            ErrorCode.INTERNAL,
            f"stage {stage.label!r} should return {stage.outputs_count} values, returned {returned!r:.80}",
        )
    return outputs


class RunTable:
    """Runs by request id, model calls by call id, and the calls waiting for room in the pipeline.

    `in_pipeline` counts calls published to the agents and not yet answered, even when their runs were dropped
    (deadline): their results still occupy the pipeline until they come back.
    """

    def __init__(self, max_inflight_calls: int) -> None:
        self.runs: dict[tuple[bytes, Any], MethodRun] = {}
        self.calls: dict[int, HeldCall] = {}
        self.queued_calls: deque[HeldCall] = deque()
        self.in_pipeline: set[int] = set()
        self.max_inflight_calls = max_inflight_calls
        self.last_progress = time.monotonic()
        """When the pipeline last moved: a call entered an empty pipeline or a result came back."""
        self.call_ids = itertools.count(1)
        """Every model call's id (the table's calls and stage threads' steps share it)."""
        self.on_remove: Callable[[MethodRun], None] = lambda run: None
        """Told of every run that ends, however (its sequence slot is freed: steps.Steps.end)."""

    def __len__(self) -> int:
        return len(self.runs)

    def new_call(self, inputs: list[np.ndarray], slots: list[tuple[MethodRun, int]], batched: bool) -> None:
        call = HeldCall(next(self.call_ids), inputs, slots, batched)
        self.calls[call.call_id] = call
        self.queued_calls.append(call)

    def next_sendable(self) -> HeldCall | None:
        """The oldest queued call still needed, if the pipeline has room for it."""
        while self.queued_calls and len(self.in_pipeline) < self.max_inflight_calls:
            call = self.queued_calls.popleft()
            if not call.alive:
                self.calls.pop(call.call_id, None)
                continue
            if not self.in_pipeline:
                self.last_progress = time.monotonic()
            self.in_pipeline.add(call.call_id)
            return call
        return None

    def take_result(self, call_id: int) -> HeldCall | None:
        """The call a result answers (its runs may be finished already)."""
        self.in_pipeline.discard(call_id)
        self.last_progress = time.monotonic()
        return self.calls.pop(call_id, None)

    def reached_agents(self, run: MethodRun) -> bool:
        """Whether a call serving `run` has been published to the agents and is not back yet."""
        return any(call_id in self.calls and any(r is run for r, _ in self.calls[call_id].slots)
                   for call_id in self.in_pipeline)

    def add_run(self, run: MethodRun) -> None:
        key = (run.client, run.request_id)
        if key in self.runs:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"request id {run.request_id!r} is already running")
        self.runs[key] = run

    def remove_run(self, run: MethodRun) -> None:
        run.finished = True
        if self.runs.pop((run.client, run.request_id), None) is not None:
            self.on_remove(run)

    def forget_pipeline(self) -> None:
        """The agents were lost: nothing published to them will come back."""
        self.in_pipeline.clear()
        self.calls.clear()
        self.queued_calls.clear()

    def expired(self, now: float | None = None) -> list[MethodRun]:
        now = now if now is not None else time.monotonic()
        return [run for run in self.runs.values() if run.deadline is not None and run.deadline <= now]


def check_model_input(instance: int, value: Any, expected: TensorSpec, batched: bool) -> None:
    """Reject an input the model cannot take before it reaches any agent."""
    name = expected.name or "?"
    if not isinstance(value, np.ndarray):
        raise ServingError(ErrorCode.INVALID_ARGUMENT,
                           f"instance {instance}: model input {name!r} must be a tensor, got {type(value).__name__}")
    if dtype_name(value.dtype) != expected.dtype:
        raise ServingError(ErrorCode.INVALID_ARGUMENT,
                           f"instance {instance}: model input {name!r} must be {expected.dtype}, got {value.dtype}")
    shape = expected.shape[1:] if batched else expected.shape
    if len(shape) != value.ndim or any(e >= 0 and e != d for e, d in zip(shape, value.shape, strict=True)):
        raise ServingError(ErrorCode.INVALID_ARGUMENT,
                           f"instance {instance}: model input {name!r} must have shape {tuple(shape)} "
                           f"(-1 = any), got {value.shape}")
