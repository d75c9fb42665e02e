"""The servable API and its loader.

A servable folder holds `servable_config.py`, written like MindSpore Serving's: it declares one distributed model
with `distributed.declare_servable(...)` and registers methods with `@register.register_method(output_names=...)`,
whose bodies chain stages with `register.add_stage(model_or_function, *inputs, outputs_count=N)`.

Registering a method *traces* its body once: the parameters are placeholders (`ValueRef`), each `add_stage` call
appends a `Stage` and returns placeholders for its outputs. The worker later replays the recorded stages for
every instance. `load_servable` runs the config file and turns every mistake into a `ServableConfigError` that
names the file and the problem.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import threading
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zmserve.protocol import MethodSignature, ModelSignature, Retry, TensorSpec, ValueSpec

CHAT_TEMPLATE_FILE = "chat_template.jinja"
METHOD_INPUT = -1
"""`ValueRef.stage` of a method parameter."""


class ServableConfigError(Exception):
    """A servable_config.py that cannot be served; raised at start, never at request time."""


class InvalidInput(ValueError):
    """Raised by a servable's Python stage when the request's input is wrong (e.g. a number where text is
    expected): the caller gets INVALID_ARGUMENT with this message. A stage's TypeError and ValueError count the
    same way; any other exception is the servable's fault and answers INTERNAL."""


@dataclass(frozen=True)
class ValueRef:
    """A value inside a traced method: output `index` of stage `stage`, or method parameter `index`."""

    stage: int
    index: int
    name: str = field(compare=False)


@dataclass(frozen=True)
class DistributedModel:
    """What `declare_servable` returns: the shape of the model's cluster, not the model itself."""

    rank_size: int
    stage_size: int
    with_batch_dim: bool

    @property
    def ranks_per_stage(self) -> int:
        return self.rank_size // self.stage_size

    def stage_of(self, rank: int) -> int:
        return rank // self.ranks_per_stage

    def ranks_of(self, stage: int) -> range:
        return range(stage * self.ranks_per_stage, (stage + 1) * self.ranks_per_stage)

    def call(self, *args: Any, subgraph: int = 0) -> Any:
        """Call the model from a Python stage, as MindSpore Serving's `Model.call`: `call(x1, x2)` for one instance
        (returns its output, or a tuple of outputs), `call([[x1, x2], ...])` for several (returns a list of output
        tuples). `subgraph` selects the graph of a multi-subgraph model. The worker runs a stage that calls the
        model on a thread of its own; this blocks that thread until the agents answered."""
        caller: ModelCaller | None = getattr(_stage_thread, "caller", None)
        if caller is None:
            raise RuntimeError("model.call may only be used inside a Python stage that the worker runs")
        if not isinstance(subgraph, int) or isinstance(subgraph, bool) or subgraph < 0:
            raise ServableConfigError(f"subgraph must be a non-negative integer, got {subgraph!r}")
        if not args:
            raise ValueError("model.call needs inputs: call(x1, x2) or call([[x1, x2], ...])")
        if len(args) == 1 and isinstance(args[0], list | tuple):
            return [tuple(caller(list(instance), subgraph)) for instance in args[0]]
        outputs = caller(list(args), subgraph)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


ModelCaller = Callable[[list[Any], int], list[Any]]
"""(inputs of one instance, subgraph) -> its outputs: how a stage thread reaches the worker's loop."""
_stage_thread = threading.local()


def set_model_caller(caller: ModelCaller | None) -> None:
    """Called by the worker on a stage thread: `model.call` on this thread goes through `caller`."""
    _stage_thread.caller = caller


def calls_model(function: Callable[..., Any], model: DistributedModel) -> bool:
    """Whether a Python stage may call `model` (`model.call`): its code, or the code of a function of its module it
    names, refers to the model object. Such a stage runs on a thread of its own (it blocks while the agents work)."""
    seen: set[int] = set()

    def refers(code: types.CodeType, namespace: dict[str, Any], closure: tuple[Any, ...] | None) -> bool:
        if id(code) in seen:
            return False
        seen.add(id(code))
        values = [namespace.get(name) for name in code.co_names]
        values += [cell.cell_contents for cell in closure or () if _cell_filled(cell)]
        for value in values:
            if value is model:
                return True
            if isinstance(value, types.FunctionType) and value.__globals__ is namespace \
                    and refers(value.__code__, namespace, value.__closure__):
                return True
        return any(refers(const, namespace, None) for const in code.co_consts if isinstance(const, types.CodeType))

    function = inspect.unwrap(function)
    code = getattr(function, "__code__", None)
    return code is not None and refers(code, getattr(function, "__globals__", {}), function.__closure__)


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Stage:
    """One step of a method: the distributed model (`function is None`) or a Python function."""

    function: Callable[..., Any] | None
    inputs: tuple[ValueRef, ...]
    outputs_count: int
    batch_size: int | None = None
    calls_model: bool = False
    """A Python stage that calls the model (`model.call`): it runs on a thread per request."""

    @property
    def is_model(self) -> bool:
        return self.function is None

    @property
    def label(self) -> str:
        return "model" if self.function is None else getattr(self.function, "__name__", repr(self.function))


@dataclass(frozen=True)
class MethodSpec:
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    stages: tuple[Stage, ...]
    outputs: tuple[ValueRef, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    """Optional inputs (a parameter with a default value): what a request that leaves one out gets."""


@dataclass
class ServableSpec:
    name: str
    config_path: Path
    model: DistributedModel | None = None
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    retry_on_replica_loss: Retry = Retry.BEFORE_MODEL
    """When the broker may send a request to another replica if its worker is lost (PROTOCOL.md §4.10); a request
    can choose otherwise (`Request.retry`)."""
    chat_template: str = ""
    """`chat_template.jinja` beside servable_config.py ("" without one): a Jinja chat template, as Hugging Face's
    tokenizer configs hold, that the gateway's OpenAI chat endpoint renders with `messages` and
    `add_generation_prompt` (docs/HTTP.md)."""


@dataclass
class _MethodTrace:
    name: str
    stages: list[Stage] = field(default_factory=list)


_loading: ServableSpec | None = None
_tracing: _MethodTrace | None = None


def declare_servable(
    rank_size: int,
    stage_size: int,
    with_batch_dim: bool = True,
    without_batch_dim_inputs: int | list[int] | tuple[int, ...] | None = None,
    enable_pipeline_infer: bool = False,
    retry_on_replica_loss: str = Retry.BEFORE_MODEL,
) -> DistributedModel:
    """Declare the distributed model of this servable: `rank_size` agents in `stage_size` pipeline stages.

    `enable_pipeline_infer` is accepted for compatibility: zmserve always pipelines stages.
    `without_batch_dim_inputs` is not supported: with a batch dimension, every model input is batched.
    `retry_on_replica_loss` (zmserve's own): when the broker may send a request to another replica if its worker is
    lost: "before_model" (default: only if the lost replica's model never saw it), "until_result" (also if that
    model may have run it, but its result was lost with the worker) or "never" (a Python stage with side effects).
    A request may choose otherwise.
    """
    spec = _require_loading("declare_servable")
    if without_batch_dim_inputs not in (None, [], ()):
        raise ServableConfigError("without_batch_dim_inputs is not supported by zmserve: every model input of a "
                                  "with_batch_dim servable is batched")
    if spec.model is not None:
        raise ServableConfigError("declare_servable may be called only once per servable")
    for label, number in (("rank_size", rank_size), ("stage_size", stage_size)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise ServableConfigError(f"{label} must be a positive integer, got {number!r}")
    if rank_size % stage_size != 0:
        raise ServableConfigError(
            f"rank_size {rank_size} is not divisible by stage_size {stage_size}: every stage needs the same "
            "number of agents"
        )
    spec.model = DistributedModel(rank_size, stage_size, bool(with_batch_dim))
    if retry_on_replica_loss not in set(Retry):
        raise ServableConfigError(f"retry_on_replica_loss must be one of {[r.value for r in Retry]}, "
                                  f"got {retry_on_replica_loss!r}")
    spec.retry_on_replica_loss = Retry(retry_on_replica_loss)
    return spec.model


def register_method(output_names: str | list[str] | tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Register the decorated function as a method; its body is traced once, now."""
    names = (output_names,) if isinstance(output_names, str) else tuple(output_names)

    def decorate(function: Callable) -> Callable:
        global _tracing
        spec = _require_loading("register_method")
        name = function.__name__
        if name in spec.methods:
            raise ServableConfigError(f"method {name!r} is registered twice")
        parameters = list(inspect.signature(function).parameters.values())
        for parameter in parameters:
            if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
                raise ServableConfigError(f"method {name!r}: parameter {parameter.name!r} must be positional")
        input_names = tuple(p.name for p in parameters)
        _tracing = _MethodTrace(name)
        try:
            returned = function(*(ValueRef(METHOD_INPUT, i, n) for i, n in enumerate(input_names)))
            stages = _tracing.stages
        finally:
            _tracing = None
        outputs = returned if isinstance(returned, tuple) else (returned,)
        if not all(isinstance(output, ValueRef) for output in outputs):
            raise ServableConfigError(
                f"method {name!r} must return the inputs or the results of add_stage, got {returned!r}"
            )
        if len(outputs) != len(names):
            raise ServableConfigError(
                f"method {name!r} returns {len(outputs)} values but output_names has {len(names)}: {list(names)}"
            )
        defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        spec.methods[name] = MethodSpec(name, input_names, names, tuple(stages), tuple(outputs), defaults)
        return function

    return decorate


def add_stage(
    stage: DistributedModel | Callable[..., Any],
    *args: ValueRef,
    outputs_count: int,
    batch_size: int | None = None,
    tag: str | None = None,
) -> ValueRef | tuple[ValueRef, ...]:
    """Append a stage to the method being registered; returns placeholders for its outputs.

    Python stages run once per instance; `batch_size` and `tag` are accepted for compatibility and ignored.
    """
    spec = _require_loading("add_stage")
    if _tracing is None:
        raise ServableConfigError("add_stage may only be called inside a method decorated with register_method")
    if isinstance(stage, DistributedModel):
        if stage is not spec.model:
            raise ServableConfigError(
                f"method {_tracing.name!r} uses a model that this servable did not declare with declare_servable"
            )
        function = None
    elif callable(stage):
        function = stage
    else:
        raise ServableConfigError(
            f"method {_tracing.name!r}: add_stage needs the model from declare_servable or a Python function, "
            f"got {stage!r}"
        )
    for arg in args:
        if not isinstance(arg, ValueRef):
            raise ServableConfigError(
                f"method {_tracing.name!r}: add_stage inputs must be method inputs or stage outputs, got {arg!r}"
            )
    if not isinstance(outputs_count, int) or outputs_count < 1:
        raise ServableConfigError(f"outputs_count must be a positive integer, got {outputs_count!r}")
    index = len(_tracing.stages)
    threaded = function is not None and spec.model is not None and calls_model(function, spec.model)
    _tracing.stages.append(Stage(function, tuple(args), outputs_count, batch_size, threaded))
    label = "model" if function is None else function.__name__
    outputs = tuple(ValueRef(index, i, f"{label}[{i}]") for i in range(outputs_count))
    return outputs[0] if outputs_count == 1 else outputs


def load_servable(servable_directory: str | Path, servable_name: str) -> ServableSpec:
    """Run `servable_directory/servable_name/servable_config.py` and return what it declared."""
    global _loading
    config_path = Path(servable_directory) / servable_name / "servable_config.py"
    if not config_path.is_file():
        raise ServableConfigError(f"no servable config at {config_path}")
    spec = ServableSpec(servable_name, config_path)
    module_name = f"zmserve_servable_{servable_name}"
    module_spec = importlib.util.spec_from_file_location(module_name, config_path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(config_path.parent))
    _loading = spec
    try:
        module_spec.loader.exec_module(module)
    except ServableConfigError as exc:
        raise ServableConfigError(f"{config_path}: {exc}") from None
    except SyntaxError as exc:
        raise ServableConfigError(f"{config_path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        raise ServableConfigError(
            f"{config_path}: {type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
        ) from None
    finally:
        _loading = None
        sys.path.remove(str(config_path.parent))
    if spec.model is None:
        raise ServableConfigError(f"{config_path}: no distributed model declared (call declare_servable)")
    if not spec.methods:
        raise ServableConfigError(f"{config_path}: no method registered (use register_method)")
    template = config_path.parent / CHAT_TEMPLATE_FILE
    if template.is_file():
        spec.chat_template = template.read_text()
    return spec


def _require_loading(api: str) -> ServableSpec:
    if _loading is None:
        raise ServableConfigError(f"{api} may only be called while zmserve loads a servable_config.py")
    return _loading


def method_signatures(spec: ServableSpec, model: ModelSignature, with_batch_dim: bool) -> dict[str, MethodSignature]:
    """Each method's inputs and outputs as a client sees them: dtype and shape (without the batch dimension) from
    the model's signature for a value that goes straight into or comes straight out of the model stage; unknown
    for a value a Python stage makes or takes."""

    def client_view(name: str, tensor: TensorSpec) -> ValueSpec:
        return ValueSpec(name, tensor.dtype, tensor.shape[1:] if with_batch_dim else tensor.shape)

    signatures = {}
    for method in spec.methods.values():
        model_stage = next((i for i, stage in enumerate(method.stages) if stage.is_model), None)
        stage_inputs = method.stages[model_stage].inputs if model_stage is not None else ()
        inputs = []
        for index, name in enumerate(method.input_names):
            ref = ValueRef(METHOD_INPUT, index, name)
            position = stage_inputs.index(ref) if ref in stage_inputs else None
            known = model.inputs is not None and position is not None and position < len(model.inputs)
            inputs.append(client_view(name, model.inputs[position]) if known else ValueSpec(name))
        outputs = []
        for name, ref in zip(method.output_names, method.outputs, strict=True):
            known = model.outputs is not None and ref.stage == model_stage and ref.index < len(model.outputs)
            outputs.append(client_view(name, model.outputs[ref.index]) if known else ValueSpec(name))
        signatures[method.name] = MethodSignature(inputs, outputs)
    return signatures
