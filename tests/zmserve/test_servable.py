"""servable_config.py is traced at load time; every mistake is a ServableConfigError naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from zmserve.protocol import MethodSignature, ModelSignature, TensorSpec, ValueSpec
from zmserve.servable import METHOD_INPUT, ServableConfigError, load_servable, method_signatures

HEADER = "from zmserve.server import distributed, register\n"


def write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "svc").mkdir(exist_ok=True)
    (tmp_path / "svc" / "servable_config.py").write_text(HEADER + body)
    return tmp_path


def test_reference_config_is_traced_into_stages(tmp_path: Path) -> None:
    write(tmp_path, """
model = distributed.declare_servable(rank_size=16, stage_size=2, with_batch_dim=False)

def scale(x):
    return x * 2

@register.register_method(output_names=["y", "x2"])
def predict(x):
    x2 = register.add_stage(scale, x, outputs_count=1)
    y = register.add_stage(model, x2, outputs_count=1)
    return y, x2
""")
    spec = load_servable(tmp_path, "svc")
    assert spec.model is not None and spec.model.ranks_per_stage == 8 and list(spec.model.ranks_of(1)) == list(
        range(8, 16))
    method = spec.methods["predict"]
    assert method.input_names == ("x",) and method.output_names == ("y", "x2")
    assert [s.is_model for s in method.stages] == [False, True]
    assert method.stages[0].inputs[0].stage == METHOD_INPUT
    assert method.stages[1].inputs[0].stage == 0
    assert [(o.stage, o.index) for o in method.outputs] == [(1, 0), (0, 0)]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("model = distributed.declare_servable(rank_size=8, stage_size=1\n", "syntax error"),
        ("model = distributed.declare_servable(rank_size=6, stage_size=4)\n", "not divisible by stage_size"),
        ("model = distributed.declare_servable(rank_size=0, stage_size=1)\n", "rank_size must be a positive"),
        ("""
model = distributed.declare_servable(rank_size=2, stage_size=1)
@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage("not_a_model", x, outputs_count=1)
""", "needs the model from declare_servable"),
        ("""
model = distributed.declare_servable(rank_size=2, stage_size=1)
other = object()
@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(other, x, outputs_count=1)
""", "needs the model from declare_servable"),
        ("""
model = distributed.declare_servable(rank_size=2, stage_size=1)
@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
""", "registered twice"),
        ("""
model = distributed.declare_servable(rank_size=2, stage_size=1)
@register.register_method(output_names=["y", "z"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
""", "output_names has 2"),
        ("""
@register.register_method(output_names=["y"])
def predict(x):
    return x
""", "no distributed model declared"),
        ("model = distributed.declare_servable(rank_size=2, stage_size=1)\n", "no method registered"),
        ("import no_such_module_here\n", "ModuleNotFoundError"),
    ],
)
def test_broken_config_fails_with_a_clear_message(tmp_path: Path, body: str, fragment: str) -> None:
    write(tmp_path, body)
    with pytest.raises(ServableConfigError) as caught:
        load_servable(tmp_path, "svc")
    assert fragment in str(caught.value)
    assert "servable_config.py" in str(caught.value)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ServableConfigError, match="no servable config"):
        load_servable(tmp_path, "absent")


def test_api_outside_loading_is_refused() -> None:
    from zmserve.server import distributed

    with pytest.raises(ServableConfigError, match="only be called while zmserve loads"):
        distributed.declare_servable(rank_size=1, stage_size=1)


def test_method_signatures_know_what_goes_straight_to_and_from_the_model(tmp_path: Path) -> None:
    write(tmp_path, """
model = distributed.declare_servable(rank_size=2, stage_size=1, with_batch_dim=True)

def tokenize(text):
    return text

@register.register_method(output_names=["y"])
def predict(x, mask):
    y = register.add_stage(model, x, mask, outputs_count=1)
    return y

@register.register_method(output_names=["y", "ids"])
def embed(text):
    ids = register.add_stage(tokenize, text, outputs_count=1)
    y = register.add_stage(model, ids, ids, outputs_count=1)
    return y, ids
""")
    spec = load_servable(tmp_path, "svc")
    model = ModelSignature(inputs=[TensorSpec("a", "float32", [-1, 8]), TensorSpec("m", "int32", [-1, 8])],
                           outputs=[TensorSpec("b", "float32", [-1, 4])])
    signatures = method_signatures(spec, model, with_batch_dim=True)
    assert list(signatures) == ["predict", "embed"]  # declaration order
    assert signatures["predict"] == MethodSignature(
        inputs=[ValueSpec("x", "float32", [8]), ValueSpec("mask", "int32", [8])],
        outputs=[ValueSpec("y", "float32", [4])])
    assert signatures["embed"] == MethodSignature(inputs=[ValueSpec("text")],
                                                  outputs=[ValueSpec("y", "float32", [4]), ValueSpec("ids")])
    unknown = method_signatures(spec, ModelSignature(), with_batch_dim=True)
    assert unknown["predict"].inputs == [ValueSpec("x"), ValueSpec("mask")]
