"""The request pipeline of a worker: requests in, Python stages here, model calls out to the agents, replies back.

A request becomes a `MethodRun` that walks its method's stages (`advance`). At the model stage its instances
become model calls: one per instance, or rows of batches (`Batcher`) when the model has a batch dimension. Calls
are published while the pipeline has room (`max_inflight_calls`); results come back in `take_result`, and the
runs they complete walk on. Every run ends in exactly one `answer`: its reply or an error.

No sockets here: the worker gives the two ways out (`publish` a model call to stage 0, `answer` a client).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from zmserve import trace as tracing
from zmserve.codec import Instance, decode_values, encode_instances, encode_values
from zmserve.logs import Bursts, get_logger
from zmserve.metrics import OK, WorkerMetrics
from zmserve.protocol import (
    ErrorCode,
    ModelError,
    ModelResult,
    ModelSignature,
    Partial,
    Reply,
    ServingError,
    TensorSpec,
    encode,
    error_frame,
)
from zmserve.protocol import ModelCall as ModelCallMessage
from zmserve.servable import DistributedModel, Stage
from zmserve_services.worker.batching import Batcher
from zmserve_services.worker.requests import HeldCall, MethodRun, RunTable, check_model_input
from zmserve_services.worker.stage_threads import CallWanted, RunEnded, StageDone, StageEvent, StagePartial
from zmserve_services.worker.steps import Steps
from zmserve_services.worker.streaming import GeneratorStage, is_generator_stage

log = get_logger("worker")
bursts = Bursts(log)
"""Events that may come once per request or call: counted and summarised (logs.Bursts), never a line each."""

Publish = Callable[[list[Any]], None]
"""Send [header, *values] of a MODEL_CALL to every stage-0 agent."""
Answer = Callable[[bytes, Any, str, list[Any]], None]
"""Send [header, *values] of a REPLY or ERROR for request id (2nd) to the client with this routing identity."""
StartStage = Callable[[MethodRun, Stage], None]
"""Run a Python stage that calls the model on a thread of its own (stage_threads.StageThreads.start)."""
SendPartial = Callable[[bytes, list[Any]], None]
"""Send [header, *values] of a PARTIAL to the client with this routing identity (the request stays open)."""


class Pipeline:
    def __init__(self, model: DistributedModel, max_inflight_calls: int, max_queued_requests: int,
                 publish: Publish, answer: Answer, metrics: WorkerMetrics | None = None,
                 start_stage: StartStage | None = None, max_sequences: int = 0, step_wait: float = 0.002,
                 partial: SendPartial | None = None) -> None:
        self.model = model
        self.metrics = metrics or WorkerMetrics("", 0, enabled=False)
        self.max_queued_requests = max_queued_requests
        self.publish, self.answer, self.partial = publish, answer, partial
        self.table = RunTable(max_inflight_calls)
        self.start_stage = start_stage
        self.steps = Steps(publish, self.table.call_ids, self.metrics, max_sequences, step_wait,
                           model.with_batch_dim)
        """Calls of stages that call the model (`model.call`): continuous batching (steps.py)."""
        self.table.on_remove = self.steps.end
        self.signature = ModelSignature()
        self.batcher: Batcher | None = None
        self.generators: dict[MethodRun, GeneratorStage] = {}
        """Runs at a generator stage, stepped one yield per loop turn (`step_generators`)."""
        self.stats = {"requests": 0, "model_calls": 0, "model_rows": 0}
        self.started: list[tuple[bytes, Any]] = []
        """(client, request id) of the runs whose first model call was published since the worker last told the
        broker (it tells before the calls leave: `Worker.release_calls`)."""

    def start(self, signature: ModelSignature, max_batch_size: int, max_batch_delay: float,
              subgraphs: list[ModelSignature] | None = None) -> None:
        """The agents serve: check inputs against their signature from now on, and batch if the model can."""
        self.signature = signature
        self.steps.start(subgraphs or [signature])
        self.batcher = None
        if self.model.with_batch_dim:
            fixed = (signature.inputs or [TensorSpec("", "", [-1])])[0].shape[0]
            self.batcher = Batcher(max_batch_size, max_batch_delay, pad_to=fixed if fixed > 0 else None)

    # ---- requests in ----------------------------------------------------------------------------------------
    def check_room(self) -> None:
        """Refuse a new request while the worker holds too many (checked before its values are decoded)."""
        if len(self.table) >= self.max_queued_requests:
            raise ServingError(ErrorCode.RESOURCE_EXHAUSTED,
                               f"{len(self.table)} requests are queued, the limit is {self.max_queued_requests}")

    def admit(self, run: MethodRun) -> None:
        """Take a new request and walk it as far as it goes now. One whose stage calls the model holds a sequence
        slot from now until it ends (steps.py), or is refused RESOURCE_EXHAUSTED at once."""
        if any(stage.calls_model for stage in run.method.stages):
            self.steps.reserve(run)
        try:
            self.table.add_run(run)
        except ServingError:
            self.steps.end(run)
            raise
        self.stats["requests"] += 1
        self.advance(run)

    def advance(self, run: MethodRun) -> None:
        """Walk a run through its stages until it waits on the model or is done."""
        try:
            while (stage := run.current_stage) is not None:
                if stage.calls_model and self.start_stage is not None:
                    self.steps.computing.add(run)
                    self.start_stage(run, stage)
                    return
                if is_generator_stage(stage):
                    self.generators[run] = GeneratorStage(run, stage)
                    return
                if not stage.is_model:
                    started = time.perf_counter()
                    run.run_python_stage(stage)
                    self.metrics.stage_ran(run.method.name, stage.label, started)
                    continue
                if run.deadline is not None and time.monotonic() >= run.deadline:
                    raise ServingError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed before the model stage")
                run.model_queued = time.perf_counter()
                self.queue_model_calls(run, run.model_inputs(stage))
                self.publish_calls()
                return
            specs, frames = encode_instances(run.results())
        except ServingError as error:
            self.fail(run, error.code, error.message)
            return
        except Exception as exc:
            bursts.exception("request_crashed", request_id=run.request_id)
            self.fail(run, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        self.table.remove_run(run)
        self.metrics.request_done(run.method.name, OK, run.started)
        tracing.stamp(run.trace, tracing.WORKER_REPLY)
        self.answer(run.client, run.request_id, OK,
                    [encode(Reply(id=run.request_id, instances=specs, trace=run.trace)), *frames])

    def queue_model_calls(self, run: MethodRun, per_instance: list[list[Any]]) -> None:
        """Check inputs against the model's signature, then queue one call per instance, or hand the instances
        to the batcher when the model has a batch dimension."""
        expected = self.signature.inputs or []
        for index, inputs in enumerate(per_instance):
            for position, value in enumerate(inputs):
                if position < len(expected):
                    check_model_input(index, value, expected[position], self.model.with_batch_dim)
                elif not isinstance(value, np.ndarray):
                    raise ServingError(ErrorCode.INVALID_ARGUMENT,
                                       f"instance {index}: model input {position} must be a tensor")
        run.awaiting = len(per_instance)
        for index, inputs in enumerate(per_instance):
            if self.batcher is None:
                self.table.new_call(list(inputs), [(run, index)], batched=False)
            else:
                self.batcher.add((run, index), list(inputs))
        self.flush_batches()

    def flush_batches(self) -> None:
        """Turn every batch that is full or has waited long enough into a model call."""
        if self.batcher is None:
            return
        for batch in self.batcher.take_ready(idle=not self.table.in_pipeline and not self.table.queued_calls):
            if any(not run.finished for run, _ in batch.slots):
                self.table.new_call(batch.inputs, batch.slots, batched=True)

    def publish_calls(self) -> None:
        """Send queued calls while the pipeline has room; PUB never drops because the room is bounded."""
        while (call := self.table.next_sendable()) is not None:
            specs, frames = encode_values({f"input{i}": v for i, v in enumerate(call.inputs)})
            traced = [run.trace for run, _ in call.slots if run.trace is not None]
            for stamps in traced:
                tracing.stamp(stamps, tracing.WORKER_OUT)
            header = encode(ModelCallMessage(call=call.call_id, request_id=call.slots[0][0].request_id,
                                             values=specs, trace=[] if traced else None))
            for run, _ in call.slots:
                if not run.reached_model:
                    run.reached_model = True
                    self.started.append((run.client, run.request_id))
            self.publish([header, *frames])
            call.published = self.metrics.call_published(call.slots[0][0].model_queued, len(call.slots), frames)
            self.stats["model_calls"] += 1
            self.stats["model_rows"] += len(call.slots)

    def cancel(self, client: bytes, request_id: Any) -> None:
        """The client gave up, and the broker has answered it: forget the run without answering. Its calls still
        queued here are never published (`next_sendable` and `flush_batches` skip finished runs, and its rows leave
        the batcher now); a call already with the agents finishes, and `finish_call` discards its rows."""
        run = self.table.runs.get((client, request_id))
        if run is None:
            return
        reached_agents = self.table.reached_agents(run)
        self.table.remove_run(run)
        self.stop_generators(run)
        if self.batcher is not None:
            self.batcher.discard(run)
        self.metrics.request_done(run.method.name, ErrorCode.CANCELLED, run.started)
        log.info("request_cancelled", request_id=request_id, reached_agents=reached_agents)

    # ---- stage threads --------------------------------------------------------------------------------------
    def stage_events(self, events: list[StageEvent]) -> None:
        """What stage threads posted: model calls they want, partial outputs, their end."""
        for event in events:
            run = event.run
            if isinstance(event, CallWanted):
                self.steps.computing.discard(run)
                if run.finished:
                    event.future.set_exception(RunEnded())
                    continue
                try:
                    self.steps.want(event)
                except ServingError as error:
                    event.future.set_exception(error)
            elif isinstance(event, StagePartial):
                per_instance: list[Instance] = [{} for _ in run.values]
                per_instance[event.instance] = event.values
                try:
                    self.send_partial(run, per_instance)
                except ServingError as error:
                    self.fail(run, error.code, error.message)
            elif isinstance(event, StageDone):
                self.steps.computing.discard(run)
                self.stage_done(event)
        self.steps.pump()

    def stage_done(self, done: StageDone) -> None:
        run = done.run
        if run.finished:
            return
        if done.error is not None:
            self.fail(run, done.error.code, done.error.message)
            return
        stage = run.current_stage
        assert stage is not None and done.outputs is not None
        for index, outputs in enumerate(done.outputs):
            run.keep_outputs(index, outputs)
        self.metrics.stage_ran(run.method.name, stage.label, run.started)
        run.stage_index += 1
        self.advance(run)

    # ---- generator stages and partial answers ---------------------------------------------------------------
    def step_generators(self) -> None:
        """Once per loop turn: every run at a generator stage advances by one yield, which a streaming request gets
        as a PARTIAL; a run whose generators ended walks on to its next stage."""
        for run, stage in list(self.generators.items()):
            if run.finished:
                continue
            try:
                yielded = stage.step()
                if any(yielded):
                    self.send_partial(run, yielded)
            except ServingError as error:
                self.fail(run, error.code, error.message)
                continue
            if stage.done and not run.finished:
                del self.generators[run]
                stage.keep_outputs()
                self.metrics.stage_ran(run.method.name, stage.stage.label, stage.started)
                self.advance(run)

    def send_partial(self, run: MethodRun, per_instance: list[Instance]) -> None:
        """Send what a generator stage yielded for `run` (one dict per instance, {} for none) as its next PARTIAL,
        if the request asked for a stream; nothing once the run is answered. The one place a PARTIAL is made:
        loop-run generator stages and threaded stages (on the loop thread) both call it. A value that cannot be
        encoded is the servable's mistake: ServingError INTERNAL."""
        if not run.stream or run.finished:
            return
        try:
            specs, frames = encode_instances(per_instance)
        except ServingError as error:
            raise ServingError(ErrorCode.INTERNAL, f"method {run.method.name!r} yielded a value that cannot be "
                                                   f"sent: {error.message}") from None
        header = encode(Partial(id=run.request_id, seq=run.partials_sent, instances=specs))
        run.partials_sent += 1
        assert self.partial is not None, "a pipeline that streams needs a way to send partials"
        self.partial(run.client, [header, *frames])

    def stop_generators(self, run: MethodRun) -> None:
        """The run ended (answered, cancelled, expired): its generators stop now."""
        stage = self.generators.pop(run, None)
        if stage is not None:
            stage.close()

    # ---- results in -----------------------------------------------------------------------------------------
    def take_result(self, message: ModelResult | ModelError, value_frames: list[Any]) -> None:
        """A result or an error from the agents: finish the call's runs, or fail them."""
        if self.steps.take_result(message, value_frames):
            self.steps.pump()
            return
        call = self.table.take_result(message.call) if message.call is not None else None
        if call is None:
            bursts.warning("model_result_unmatched", call=message.call, type=type(message).__name__)
            return
        self.metrics.call_returned(call.published, value_frames)
        if isinstance(message, ModelResult) and message.trace is not None:
            for run, _ in call.slots:
                if run.trace is not None:
                    run.trace.extend(tuple(each) for each in message.trace)
                    tracing.stamp(run.trace, tracing.WORKER_RESULT)
        if isinstance(message, ModelError):
            self.fail_call(call, message.code, f"rank {message.rank}: {message.message}")
        else:
            try:
                outputs = list(decode_values(message.values, value_frames).values())
            except ServingError as error:
                self.fail_call(call, ErrorCode.INTERNAL, f"the model's result could not be read: {error.message}")
            else:
                self.finish_call(call, outputs)
        self.publish_calls()

    def finish_call(self, call: HeldCall, outputs: list[Any]) -> None:
        """Hand each row of the result to its run; runs whose last awaited instance this was walk on."""
        for position, (run, index) in enumerate(call.slots):
            if run.finished:
                continue
            try:
                run.finish_model_call(index, [output[position] for output in outputs] if call.batched else outputs)
            except ServingError as error:
                self.fail(run, error.code, error.message)
                continue
            except (IndexError, TypeError) as error:
                self.fail(run, ErrorCode.INTERNAL, f"the model's batched output does not fit the batch: {error}")
                continue
            if run.awaiting == 0:
                self.advance(run)

    def fail_call(self, call: HeldCall, code: ErrorCode, message: str) -> None:
        for run in {run for run, _ in call.slots if not run.finished}:
            self.fail(run, code, message)

    # ---- periodic chores and endings ------------------------------------------------------------------------
    def seconds_until_due(self) -> float | None:
        """When the pipeline next has work of its own: at once while a generator stage waits to be stepped, else
        when the oldest waiting batch or decode step must leave (None: nothing waits)."""
        if self.generators:
            return 0.0
        dues = [self.steps.seconds_until_due(), self.batcher.seconds_until_due() if self.batcher is not None
                else None]
        return min((due for due in dues if due is not None), default=None)

    def send_due_batches(self) -> None:
        """Batches that waited long enough (or every batch, when the pipeline is empty) leave now, and so does a
        decode step that waited long enough, or a release."""
        if self.steps.waiting or self.steps.releases:
            self.steps.pump()
        if self.batcher is not None and self.batcher.pending:
            self.flush_batches()
            self.publish_calls()

    def do_chores(self, now: float) -> None:
        self.send_due_batches()
        for run in self.table.expired(now):
            self.fail(run, ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed")

    def stuck_for(self, now: float) -> float:
        """Seconds the pipeline has held calls without a result coming back (0 when it holds none)."""
        if self.steps.in_flight:
            return now - min(self.steps.last_progress, self.table.last_progress if self.table.in_pipeline else now)
        return now - self.table.last_progress if self.table.in_pipeline else 0.0

    def fail(self, run: MethodRun, code: ErrorCode, message: str) -> None:
        if run.finished:
            return
        self.table.remove_run(run)
        self.stop_generators(run)
        self.metrics.request_done(run.method.name, code, run.started)
        bursts.info("request_failed", key=code, request_id=run.request_id, code=code, message=message)
        self.answer(run.client, run.request_id, code, [error_frame(run.request_id, code, message)])

    def fail_all(self, code: ErrorCode, message: str) -> None:
        """The agents are gone: answer every run, and forget every call (nothing published will come back)."""
        for run in list(self.table.runs.values()):
            self.fail(run, code, message)
        self.table.forget_pipeline()
        self.steps.forget()
        self.started.clear()  # their calls never leave (Worker.release_calls): the broker may send them elsewhere
