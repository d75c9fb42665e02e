"""zmserve/streamed_export.py against MindSpore itself: a Cell with shape-only parameters, streamed tensor by
tensor into MindIR + external data, loads with `mindspore.load` and computes exactly what the same Cell
exported by `mindspore.export` (its weights materialised) computes, and what numpy computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, sys
from pathlib import Path
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Zero
from zmserve.streamed_export import compile_graph, export_rank_streamed, shard_bytes

ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("CPU")
out = Path(sys.argv[1])
SHAPES = {"w1": (64, 96), "b1": (96,), "w2": (96, 32)}
values = {name: np.random.default_rng(i).standard_normal(shape).astype(np.float32) / 8
          for i, (name, shape) in enumerate(SHAPES.items())}


class Net(nn.Cell):
    def __init__(self, materialised):
        super().__init__()
        make = (lambda n: Tensor(values[n])) if materialised else (
            lambda n: Tensor(shape=SHAPES[n], dtype=ms.float32, init=Zero()))
        self.w1, self.b1, self.w2 = (Parameter(make(n), name=n) for n in SHAPES)

    def construct(self, x):
        return ops.matmul(ops.tanh(ops.matmul(x, self.w1) + self.b1), self.w2)


example = [Tensor(shape=[None, 64], dtype=ms.float32)]
asked = []

def fill(name, parameter):
    asked.append(name)
    return values[name]

streamed = export_rank_streamed(compile_graph(Net(False), example), out, 0, "net", {"inputs": []}, fill)
ms.export(Net(True), *example, file_name=str(out / "reference"), file_format="MINDIR")
x = np.random.default_rng(9).standard_normal((5, 64)).astype(np.float32)
run = lambda path: ms.nn.GraphCell(ms.load(str(path)))(Tensor(x)).asnumpy()
y_streamed, y_exported = run(streamed), run(out / "reference.mindir")
expected = np.tanh(x.astype(np.float64) @ values["w1"] + values["b1"]) @ values["w2"]
data = (out / "device0" / "net_variables" / "data_0").read_bytes()
print(json.dumps({"asked": sorted(asked), "same": bool(np.array_equal(y_streamed, y_exported)),
                  "error": float(np.abs(y_streamed - expected).max()), "graph_bytes": streamed.stat().st_size,
                  "data_bytes": len(data), "first_byte": data[0], "shard_bytes": shard_bytes(streamed),
                  "config": json.loads((out / "device0" / "group_config.json").read_text())}))
os._exit(0)
"""


@pytest.mark.slow
def test_a_streamed_export_loads_and_computes_what_mindspore_export_does(tmp_path: Path) -> None:
    script = tmp_path / "streamed.py"  # MindSpore compiles Cells from their source file, so not `-c`
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "GLOG_v": "3"}, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["asked"] == ["b1", "w1", "w2"]  # every parameter asked for once
    assert result["same"] and result["error"] < 1e-5
    weights = 4 * (64 * 96 + 96 + 96 * 32)
    assert result["graph_bytes"] < 10_000  # the weights are not in the graph ...
    padded = sum(-(-n // 64) * 64 for n in (4 * 64 * 96, 4 * 96, 4 * 96 * 32))
    assert result["data_bytes"] == 64 + padded >= 64 + weights  # ... but 64-byte aligned after a 64-byte header
    assert result["first_byte"] == (1 if sys.byteorder == "little" else 0)
    assert result["shard_bytes"] == result["graph_bytes"] + result["data_bytes"]
    assert result["config"] == {"rank": 0, "inputs": []}


def test_shard_bytes_counts_a_plain_mindir_alone(tmp_path: Path) -> None:
    from zmserve.streamed_export import shard_bytes

    path = tmp_path / "m.mindir"
    path.write_bytes(bytes(1234))
    assert shard_bytes(path) == 1234
    (tmp_path / "m_variables").mkdir()
    (tmp_path / "m_variables" / "data_0").write_bytes(bytes(100))
    assert shard_bytes(path) == 1334
