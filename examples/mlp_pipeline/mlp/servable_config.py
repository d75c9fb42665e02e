"""A residual MLP in 2 pipeline stages of 2 tensor-parallel agents each."""

from zmserve.server import distributed, register

model = distributed.declare_servable(rank_size=4, stage_size=2, with_batch_dim=False)


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y
