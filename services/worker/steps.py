"""Continuous batching: the model calls of stage threads (`model.call`), gathered into steps, one step at a time.

Sequences. A request of a method whose stage calls the model reserves a sequence (a slot) when it is admitted:
at most `max_sequences` at once, one more is refused RESOURCE_EXHAUSTED at once. Its calls of a stateful subgraph
name that sequence, so the agents feed its state in and keep its update (services/agent/state.py). When the
request ends, for any reason, its slot is free at once, and, if its sequence reached the agents, the sequence id
joins `releases`: the agents free its state before the next call, or on a call of its own when none is coming.

Steps. At most one call of a stateful subgraph is with the agents at a time (a sequence's next token needs its
last one anyway). When it is back, the next step is chosen:
  - a decode step merges every waiting call of the same stateful subgraph (not 0) and input shapes into ONE model
    call, one row per sequence. It leaves once no running stage thread is still computing (every sequence that
    will join this step has joined) or when its oldest call has waited `step_wait` seconds;
  - a prefill step (subgraph 0, a prompt or a chunk of one) is one sequence's call alone.
  Fairness: a prefill goes when the last step was a decode step or no decode step is ready, so at most one
  prefill chunk runs between two decode steps, and a waiting prefill is never passed over by more than one.
Stateless calls (a subgraph without state) are never merged: each is a call of its own, sent at once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zmserve.codec import decode_values, encode_values
from zmserve.logs import Bursts, get_logger
from zmserve.metrics import WorkerMetrics
from zmserve.protocol import ErrorCode, ModelError, ModelResult, ModelSignature, ServingError, encode
from zmserve.protocol import ModelCall as ModelCallMessage
from zmserve_services.worker.requests import MethodRun, check_model_input
from zmserve_services.worker.stage_threads import CallWanted, RunEnded

log = get_logger("worker")
bursts = Bursts(log)

Publish = Callable[[list[Any]], None]


@dataclass(eq=False)
class Waiting:
    wanted: CallWanted
    inputs: list[np.ndarray]
    """As the model takes them (a batch axis added when the stage passed one instance of a batched model)."""
    stateful: bool
    since: float = field(default_factory=time.monotonic)

    @property
    def shape_key(self) -> tuple[Any, ...]:
        return (self.wanted.subgraph, *((a.dtype.str, a.shape[1:]) for a in self.inputs))


@dataclass(eq=False)
class Step:
    call_id: int
    rows: list[Waiting]
    stateful: bool
    published: float = field(default_factory=time.perf_counter)


class Steps:
    def __init__(self, publish: Publish, call_ids: Iterable[int], metrics: WorkerMetrics, max_sequences: int,
                 step_wait: float, with_batch_dim: bool) -> None:
        self.publish = publish
        self.call_ids = iter(call_ids)
        self.metrics = metrics
        self.max_sequences = max_sequences
        self.step_wait = step_wait
        self.with_batch_dim = with_batch_dim
        self.subgraphs: list[ModelSignature] = []
        self.slots: dict[MethodRun, int] = {}
        """The sequence id of every request that holds a slot (of its current instance: a request of several
        instances generates them one after the other, each as a new sequence)."""
        self.instance_of: dict[MethodRun, int] = {}
        self.on_agents: set[MethodRun] = set()
        """Requests whose sequence has state on the agents (a stateful call of theirs was published)."""
        self.waiting: list[Waiting] = []
        self.stateful_step: Step | None = None
        self.other_steps: dict[int, Step] = {}
        self.releases: list[int] = []
        self.computing: set[MethodRun] = set()
        """Requests whose stage thread runs Python now (started, or handed a result, and not calling again yet): a
        decode step waits for those that hold a slot."""
        self.last_was_prefill = False
        self.last_progress = time.monotonic()
        self._sequence_ids = itertools.count(1)

    def start(self, subgraphs: list[ModelSignature]) -> None:
        self.subgraphs = subgraphs

    @property
    def stateful_model(self) -> bool:
        return any(s.stateful for s in self.subgraphs)

    # ---- sequences ------------------------------------------------------------------------------------------
    def reserve(self, run: MethodRun) -> None:
        """A request whose stage calls the model takes a slot now, or is refused at once."""
        if not self.stateful_model:
            return
        if self.max_sequences and len(self.slots) >= self.max_sequences:
            raise ServingError(ErrorCode.RESOURCE_EXHAUSTED,
                               f"all {self.max_sequences} sequence slots are in use (--max-sequences)")
        self.slots[run] = next(self._sequence_ids)

    def end(self, run: MethodRun) -> None:
        """The request ended (any reason): its waiting calls unwind its thread, its slot is free, its state goes."""
        for waiting in [w for w in self.waiting if w.wanted.run is run]:
            self.waiting.remove(waiting)
            waiting.wanted.future.set_exception(RunEnded())
        self.computing.discard(run)
        self.instance_of.pop(run, None)
        sequence = self.slots.pop(run, None)
        if sequence is not None and run in self.on_agents:
            self.on_agents.discard(run)
            self.releases.append(sequence)

    def forget(self) -> None:
        """The agents were lost (they restart with no state): nothing in flight comes back, nothing to release."""
        for waiting in self.waiting:
            waiting.wanted.future.set_exception(RunEnded())
        self.waiting.clear()
        self.computing.clear()
        self.stateful_step = None
        self.other_steps.clear()
        self.releases.clear()
        self.on_agents.clear()

    # ---- calls in -------------------------------------------------------------------------------------------
    def want(self, wanted: CallWanted) -> None:
        """A stage's model.call: check it, then wait for its step. Raises ServingError (the stage gets it)."""
        if not 0 <= wanted.subgraph < max(1, len(self.subgraphs)):
            raise ServingError(ErrorCode.INTERNAL, f"model.call(subgraph={wanted.subgraph}): the model has "
                                                   f"{max(1, len(self.subgraphs))} subgraphs")
        signature = self.subgraphs[wanted.subgraph] if self.subgraphs else ModelSignature()
        inputs = [np.asarray(value) for value in wanted.inputs]
        if self.with_batch_dim:
            inputs = [value[np.newaxis] for value in inputs]
        expected = signature.inputs or []
        if signature.inputs is not None and len(inputs) != len(expected):
            raise ServingError(ErrorCode.INTERNAL, f"model.call(subgraph={wanted.subgraph}) passed {len(inputs)} "
                                                   f"inputs, the subgraph takes {len(expected)}")
        for spec, value in zip(expected, inputs, strict=False):
            check_model_input(0, value, spec, batched=False)
        if signature.stateful:
            if wanted.run not in self.slots:
                raise ServingError(ErrorCode.INTERNAL, "a stateful model call from a request that holds no slot")
            if not inputs or len(inputs[0]) != 1:
                raise ServingError(ErrorCode.INTERNAL, "a stateful model call takes one row (the request's "
                                                       f"sequence), got {len(inputs[0]) if inputs else 0}")
            if self.instance_of.get(wanted.run, 0) != wanted.instance:  # the next instance: a fresh sequence
                self.instance_of[wanted.run] = wanted.instance
                if wanted.run in self.on_agents:
                    self.on_agents.discard(wanted.run)
                    self.releases.append(self.slots[wanted.run])
                self.slots[wanted.run] = next(self._sequence_ids)
        self.waiting.append(Waiting(wanted, inputs, signature.stateful))

    # ---- steps out ------------------------------------------------------------------------------------------
    def pump(self) -> None:
        """Send what may go now."""
        for waiting in [w for w in self.waiting if not w.stateful]:
            self.waiting.remove(waiting)
            self.send([waiting], stateful=False)
        if self.stateful_step is None and self.waiting:
            prefills = [w for w in self.waiting if w.wanted.subgraph == 0]
            decode = self.decode_ready()
            if prefills and (not self.last_was_prefill or not decode):
                self.send([prefills[0]], stateful=True)
                self.last_was_prefill = True
            elif decode:
                self.send(decode, stateful=True)
                self.last_was_prefill = False
        if self.releases and self.stateful_step is None:
            self.send([], stateful=False)

    def decode_ready(self) -> list[Waiting]:
        decodes = [w for w in self.waiting if w.wanted.subgraph != 0]
        if not decodes:
            return []
        key = decodes[0].shape_key
        rows = [w for w in decodes if w.shape_key == key]
        waited = time.monotonic() - decodes[0].since
        still_coming = any(run in self.slots for run in self.computing)
        return rows if not still_coming or waited >= self.step_wait else []

    def waiting_runs(self) -> set[MethodRun]:
        return {w.wanted.run for w in self.waiting}

    def seconds_until_due(self) -> float | None:
        decodes = [w for w in self.waiting if w.wanted.subgraph != 0]
        if self.stateful_step is not None or not decodes:
            return None
        return max(0.0, decodes[0].since + self.step_wait - time.monotonic())

    def send(self, rows: list[Waiting], stateful: bool) -> None:
        """One MODEL_CALL: the rows' inputs joined along the batch axis (none: it only releases)."""
        for row in rows:
            self.waiting.remove(row)
        call_id = next(self.call_ids)
        releases, self.releases = self.releases, []
        inputs = [np.concatenate(column) for column in zip(*(r.inputs for r in rows), strict=True)] if rows else []
        specs, frames = encode_values({f"input{i}": v for i, v in enumerate(inputs)})
        sequences = [self.slots[r.wanted.run] for r in rows] if stateful else None
        header = ModelCallMessage(call=call_id, values=specs, request_id=rows[0].wanted.run.request_id if rows
                                  else None, subgraph=rows[0].wanted.subgraph if rows else 0, sequences=sequences,
                                  release=releases)
        self.publish([encode(header), *frames])
        if not rows:
            return  # a release-only call has no result
        step = Step(call_id, rows, stateful)
        step.published = self.metrics.call_published(min(r.wanted.run.model_queued or step.published
                                                          for r in rows), len(rows), frames)
        if stateful:
            self.stateful_step = step
            self.on_agents.update(r.wanted.run for r in rows)
            if rows[0].wanted.subgraph != 0:
                self.metrics.decode_step(len(rows))
        else:
            self.other_steps[call_id] = step
        if len(self.other_steps) + (self.stateful_step is not None) == 1:
            self.last_progress = time.monotonic()

    @property
    def in_flight(self) -> int:
        return len(self.other_steps) + (self.stateful_step is not None)

    # ---- results in -----------------------------------------------------------------------------------------
    def take_result(self, message: ModelResult | ModelError, value_frames: list[Any]) -> bool:
        """A result of one of our steps (False: not ours): hand each row's outputs to its stage thread."""
        if self.stateful_step is not None and self.stateful_step.call_id == message.call:
            step, self.stateful_step = self.stateful_step, None
        elif message.call in self.other_steps:
            step = self.other_steps.pop(message.call)
        else:
            return False
        self.last_progress = time.monotonic()
        self.metrics.call_returned(step.published, value_frames)
        self.computing.update(row.wanted.run for row in step.rows if not row.wanted.run.finished)
        if isinstance(message, ModelError):
            error = ServingError(message.code, f"rank {message.rank}: {message.message}")
            for row in step.rows:
                resolve(row, error=error)
            return True
        try:
            outputs = list(decode_values(message.values, value_frames).values())
        except ServingError as error:
            for row in step.rows:
                resolve(row, error=ServingError(ErrorCode.INTERNAL, f"the model's result could not be read: "
                                                                    f"{error.message}"))
            return True
        if not step.stateful:
            resolve(step.rows[0], [o[0] for o in outputs] if self.with_batch_dim else outputs)
            return True
        now = time.perf_counter()
        for index, row in enumerate(step.rows):
            if any(len(o) != len(step.rows) for o in outputs):
                resolve(row, error=ServingError(ErrorCode.INTERNAL, "the model's output rows do not match the "
                                                                    "step's sequences"))
                continue
            run = row.wanted.run
            if run.first_token is None:
                run.first_token = now
                self.metrics.first_token(now - run.started)
            elif row.wanted.subgraph != 0:
                self.metrics.inter_token(now - (run.last_token or now))
            run.last_token = now
            resolve(row, [o[index] if self.with_batch_dim else o[index:index + 1] for o in outputs])
        return True


def resolve(row: Waiting, outputs: list[np.ndarray] | None = None, error: ServingError | None = None) -> None:
    future = row.wanted.future
    if future.done():
        return
    if error is not None:
        future.set_exception(RunEnded() if row.wanted.run.finished else error)
    else:
        future.set_result(outputs)
