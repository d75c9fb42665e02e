"""Python stages that call the model (`model.call`, MindSpore Serving's multi-subgraph and PanGu shape), each on a
thread of its own, so the worker's loop never blocks while a stage waits for the agents.

A stage thread talks to the loop only through events: `CallWanted` (a model.call; the thread blocks on its
future, which the loop resolves with the outputs or an error), `StagePartial` (a generator stage yielded) and
`StageDone` (the stage returned or raised). Events go through one queue; a byte on an inproc PUSH wakes the loop's
PULL. The loop owns every request's state: a thread never touches a `MethodRun` beyond reading its values.
When its request ends (answered, cancelled, deadline, agents lost) a waiting call raises `RunEnded` in the thread,
which unwinds and ends; its last event is ignored.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import zmq

from zmserve.codec import Instance
from zmserve.logs import Bursts, get_logger
from zmserve.protocol import ServingError
from zmserve.servable import Stage, set_model_caller
from zmserve_services.worker.requests import MethodRun, stage_failure, stage_outputs
from zmserve_services.worker.streaming import concatenated, yielded_values

log = get_logger("worker")
bursts = Bursts(log)


class RunEnded(BaseException):
    """The request ended while its stage thread waited on the model: the thread unwinds. Not an error, and a
    BaseException so that a stage's own `except Exception` lets it through."""


@dataclass(eq=False)
class CallWanted:
    """A stage's `model.call` of one instance: the loop answers `future` with the outputs or an exception."""

    run: MethodRun
    subgraph: int
    inputs: list[Any]
    instance: int = 0
    """Which of the request's instances calls (each instance is a sequence of its own, one after the other)."""
    future: Future = field(default_factory=Future)


@dataclass(eq=False)
class StagePartial:
    """A generator stage yielded `values` ({output name: value}) for instance `instance`."""

    run: MethodRun
    instance: int
    values: Instance


@dataclass(eq=False)
class StageDone:
    """The stage ended: its outputs per instance, or `error`; neither when its request had already ended."""

    run: MethodRun
    outputs: list[tuple[Any, ...] | list[Any]] | None = None
    error: ServingError | None = None


StageEvent = CallWanted | StagePartial | StageDone


class StageThreads:
    """Starts stage threads and carries their events to the loop (`wake` is the socket the loop polls)."""

    def __init__(self, context: zmq.Context) -> None:
        self.context = context
        self.endpoint = f"inproc://zmserve-stage-threads-{id(self)}"
        self.wake = context.socket(zmq.PULL)
        self.wake.bind(self.endpoint)
        self.events: queue.SimpleQueue[StageEvent] = queue.SimpleQueue()
        self.running: set[MethodRun] = set()
        """Runs whose stage thread is alive (read by the loop only; threads post StageDone instead)."""
        self.local = threading.local()
        self._names = itertools.count(1)

    def start(self, run: MethodRun, stage: Stage) -> None:
        self.running.add(run)
        threading.Thread(target=self._run, args=(run, stage), daemon=True,
                         name=f"zmserve-stage-{next(self._names)}").start()

    def take_events(self, frames: list[zmq.Frame]) -> list[StageEvent]:
        """The loop's handler side: every event queued so far (one wake byte may stand for several)."""
        events = []
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            if isinstance(event, StageDone):
                self.running.discard(event.run)
            events.append(event)
        return events

    def close(self) -> None:
        self.wake.close(linger=0)

    # ---- on the stage thread --------------------------------------------------------------------------------
    def post(self, event: StageEvent) -> None:
        self.events.put(event)
        push = getattr(self.local, "push", None)
        if push is None:
            push = self.local.push = self.context.socket(zmq.PUSH)
            push.connect(self.endpoint)
        with contextlib.suppress(zmq.Again):  # the loop reads every queued event on any wake: one may be missed
            push.send(b"", zmq.NOBLOCK)

    def call(self, run: MethodRun, inputs: list[Any], subgraph: int) -> list[Any]:
        if run.finished:
            raise RunEnded
        wanted = CallWanted(run, subgraph, inputs, getattr(self.local, "instance", 0))
        self.post(wanted)
        return wanted.future.result()

    def _run(self, run: MethodRun, stage: Stage) -> None:
        set_model_caller(lambda inputs, subgraph: self.call(run, inputs, subgraph))
        try:
            outputs = [self._instance(run, stage, index) for index in range(len(run.values))]
            done = StageDone(run, outputs)
        except RunEnded:
            done = StageDone(run)
        except ServingError as error:
            done = StageDone(run, error=error)
        finally:
            set_model_caller(None)
        self.post(done)
        push = getattr(self.local, "push", None)
        if push is not None:
            push.close(linger=1000)

    def _instance(self, run: MethodRun, stage: Stage, index: int) -> tuple[Any, ...] | list[Any]:
        """Run the stage for one instance: its outputs. A generator stage's yields go to the loop as partials, and
        its outputs are what it returns or, if nothing, what it yielded (streaming.py's rules, shared with the
        generator stages the loop runs)."""
        assert stage.function is not None
        self.local.instance = index
        try:
            returned = stage.function(*run.stage_inputs(stage, index))
            if inspect.isgenerator(returned):
                yields = []
                while True:
                    try:
                        item = next(returned)
                    except StopIteration as stop:
                        if stop.value is None:
                            return concatenated(run.method, stage, yields)
                        returned = stop.value
                        break
                    yields.append(yielded_values(run.method, item))
                    self.post(StagePartial(run, index, yields[-1]))
            return stage_outputs(stage, returned)
        except RunEnded:
            raise
        except Exception as exc:
            raise stage_failure(exc, run.request_id, stage, index) from None
