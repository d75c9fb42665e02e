"""The reference MatMul servable: one distributed model over 8 agents, one method `predict(x) -> y`.

Ported from MindSpore Serving by changing the import line only.
"""

from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size=8, stage_size=1, with_batch_dim=False)


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y
