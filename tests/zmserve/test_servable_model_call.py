"""`model.call` from Python stages (zmserve/servable.py): which stages call the model, optional method inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from zmserve.servable import ServableSpec, load_servable, set_model_caller

CONFIG = """
import numpy as np
from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size=1, stage_size=1, with_batch_dim=False)


def helper(x):
    return model.call(x, subgraph=1)


def direct(x):
    return model.call(x)


def indirect(x):
    return helper(x) + 1


def nested(x):
    def inner():
        return model.call(x)
    return inner()


def plain(x):
    return np.asarray(x) * 2


@register.register_method(output_names=["y"])
def predict(x, scale=3):
    a = register.add_stage(direct, x, outputs_count=1)
    b = register.add_stage(indirect, a, outputs_count=1)
    c = register.add_stage(nested, b, outputs_count=1)
    return register.add_stage(plain, c, outputs_count=1)
"""


@pytest.fixture
def spec(tmp_path: Path) -> ServableSpec:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "servable_config.py").write_text(CONFIG)
    return load_servable(tmp_path, "s")


def test_stages_that_reach_the_model_run_threaded_and_others_do_not(spec: ServableSpec) -> None:
    method = spec.methods["predict"]
    assert [stage.calls_model for stage in method.stages] == [True, True, True, False]


def test_a_parameter_default_makes_an_input_optional(spec: ServableSpec) -> None:
    assert spec.methods["predict"].defaults == {"scale": 3}


def test_model_call_goes_through_the_threads_caller_and_refuses_outside_a_stage(spec: ServableSpec) -> None:
    with pytest.raises(RuntimeError, match="inside a Python stage"):
        spec.model.call(1)
    seen = []
    set_model_caller(lambda inputs, subgraph: seen.append((inputs, subgraph)) or ["out"])
    try:
        assert spec.model.call(1, 2, subgraph=1) == "out"
        assert spec.model.call([[1], [2]]) == [("out",), ("out",)]
    finally:
        set_model_caller(None)
    assert seen == [([1, 2], 1), ([1], 0), ([2], 0)]
