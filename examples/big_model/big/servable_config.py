"""The big model (examples/big_model) as a servable: `predict(x) -> y`, x float32 [seq, hidden] per instance.

The layout is the export's: export_model.py copies this folder next to the model it writes and puts
layout.json (rank_size, stage_size, preset, seed) beside this file.
"""

import json
from pathlib import Path

from zmserve.server import distributed, register

LAYOUT = json.loads((Path(__file__).resolve().parent / "layout.json").read_text())

model = distributed.declare_servable(rank_size=LAYOUT["rank_size"], stage_size=LAYOUT["stage_size"],
                                     with_batch_dim=True)


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y
