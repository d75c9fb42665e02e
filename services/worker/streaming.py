"""Generator stages: a Python stage written as a generator function streams its answer (PROTOCOL.md §4.11).

Each `yield` of a dict of output values (or a tuple in the method's `output_names` order) is one PARTIAL for a
request that asked for it (`Request.stream`); what the generator returns is the stage's outputs, as a plain
stage's return value, or, when it returns nothing, the concatenation of everything it yielded (strings joined,
arrays concatenated along their first axis) as the method's outputs. A request that did not ask for a stream runs
the same generator and gets only the final REPLY.

The worker loop steps every running generator one `yield` per loop turn (`GeneratorStage.step`), so a long
stream neither blocks other requests nor misses a CANCEL: a cancelled, failed or expired request's generators
are closed at once (their `finally` blocks run). `Pipeline.send_partial` is the one place a PARTIAL is made;
stages that run on threads hand their yields to it on the loop thread.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from zmserve.codec import Instance, Value
from zmserve.logs import get_logger
from zmserve.protocol import ErrorCode, ServingError
from zmserve.servable import MethodSpec, Stage
from zmserve_services.worker.requests import MethodRun, stage_failure, stage_outputs

log = get_logger("worker")


def is_generator_stage(stage: Stage) -> bool:
    """A Python stage whose function is a generator function: it streams."""
    return stage.function is not None and inspect.isgeneratorfunction(stage.function)


def yielded_values(method: MethodSpec, yielded: Any) -> Instance:
    """One `yield` as {output name: value}: a dict naming some of the method's outputs, or a tuple (or list) of
    the first k of them in `output_names` order (a generate method yields `token_ids, text` and returns those and
    `finish_reason`). Anything else is the servable's mistake (INTERNAL)."""
    names = method.output_names
    if isinstance(yielded, dict):
        unknown = sorted(str(name) for name in yielded if name not in names)
        if unknown:
            raise ServingError(ErrorCode.INTERNAL,
                               f"method {method.name!r} yielded {unknown}, which are not among its outputs "
                               f"{list(names)}")
        return dict(yielded)
    if isinstance(yielded, tuple | list) and 0 < len(yielded) <= len(names):
        return dict(zip(names, yielded, strict=False))
    raise ServingError(ErrorCode.INTERNAL,
                       f"method {method.name!r} must yield a dict of its outputs or a tuple of (the first of) its "
                       f"outputs {list(names)} in that order, yielded {yielded!r:.80}")


def concatenated(method: MethodSpec, stage: Stage, yields: Sequence[Instance]) -> tuple[Value, ...]:
    """The stage's outputs when its generator returned nothing: per method output, everything it yielded joined
    (strings and bytes) or concatenated along the first axis (arrays; a scalar counts as one element)."""
    if stage.outputs_count != len(method.output_names):
        raise ServingError(ErrorCode.INTERNAL,
                           f"stage {stage.label!r} returned nothing, so its outputs are what it yielded, which are "
                           f"the method's {len(method.output_names)} outputs; it declares outputs_count="
                           f"{stage.outputs_count}")
    outputs = []
    for name in method.output_names:
        parts = [values[name] for values in yields if name in values]
        if not parts:
            raise ServingError(ErrorCode.INTERNAL,
                               f"stage {stage.label!r} returned nothing and never yielded output {name!r}")
        outputs.append(join(name, parts))
    return tuple(outputs)


def join(name: str, parts: Sequence[Value]) -> Value:
    if all(isinstance(part, str) for part in parts):
        return "".join(parts)  # type: ignore[arg-type]
    if all(isinstance(part, bytes) for part in parts):
        return b"".join(parts)  # type: ignore[arg-type]
    try:
        return np.concatenate([np.atleast_1d(np.asarray(part)) for part in parts])
    except ValueError as exc:
        raise ServingError(ErrorCode.INTERNAL, f"the yields of output {name!r} cannot be concatenated: {exc}") from None


class GeneratorStage:
    """One run's generator stage: one generator per instance, stepped together one `yield` at a time."""

    def __init__(self, run: MethodRun, stage: Stage) -> None:
        assert stage.function is not None
        self.run, self.stage = run, stage
        self.started = time.perf_counter()
        self.generators: list[Generator[Any, None, Any] | None] = []
        self.yields: list[list[Instance]] = [[] for _ in run.values]
        self.outputs: list[tuple[Value, ...] | list[Value] | None] = [None] * len(run.values)
        for index in range(len(run.values)):
            try:
                self.generators.append(stage.function(*run.stage_inputs(stage, index)))
            except Exception as exc:
                self.close()
                raise stage_failure(exc, run.request_id, stage, index) from None

    @property
    def done(self) -> bool:
        return all(generator is None for generator in self.generators)

    def step(self) -> list[Instance]:
        """Advance every unfinished generator by one `yield`: what each instance yielded now ({} for nothing).
        A generator that ends keeps its outputs; an exception it raises ends the run (`stage_failure`)."""
        now: list[Instance] = [{} for _ in self.generators]
        for index, generator in enumerate(self.generators):
            if generator is None:
                continue
            try:
                yielded = next(generator)
            except StopIteration as stop:
                self.generators[index] = None
                self.outputs[index] = self.final_outputs(index, stop.value)
                continue
            except Exception as exc:
                self.close()
                raise stage_failure(exc, self.run.request_id, self.stage, index) from None
            try:
                now[index] = yielded_values(self.run.method, yielded)
            except ServingError:
                self.close()
                raise
            self.yields[index].append(now[index])
        return now

    def final_outputs(self, index: int, returned: Any) -> tuple[Value, ...] | list[Value]:
        if returned is None:
            return concatenated(self.run.method, self.stage, self.yields[index])
        return stage_outputs(self.stage, returned)

    def keep_outputs(self) -> None:
        """The stage is done: its outputs become the run's values, and the run moves to its next stage."""
        for index, outputs in enumerate(self.outputs):
            assert outputs is not None
            self.run.keep_outputs(index, outputs)
        self.run.stage_index += 1

    def close(self) -> None:
        """Stop every generator still running (its `finally` blocks run now); a generator that refuses to stop is
        logged, never raised into the loop."""
        for index, generator in enumerate(self.generators):
            if generator is None:
                continue
            self.generators[index] = None
            try:
                generator.close()
            except Exception as exc:
                log.error("generator_close_failed", request_id=self.run.request_id, stage=self.stage.label,
                          instance=index, exc_info=exc)
