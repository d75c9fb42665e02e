"""The export really shards: each rank's MindIR holds only its slice of the 96x16 weight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cluster import export_matmul

pytestmark = pytest.mark.slow

CHECK = """
import json, sys
import numpy as np
import mindspore as ms
proto = ms.load_mindir(sys.argv[1])
print(json.dumps([{"name": p.name, "dims": list(p.dims), "values": np.frombuffer(p.raw_data, np.float32).tolist()}
                  for p in proto.graph.parameter]))
"""


@pytest.mark.parametrize("rank_size", [2, 8])
def test_each_rank_holds_only_its_slice(tmp_path: Path, rank_size: int) -> None:
    model_files = export_matmul(tmp_path, rank_size)
    for rank, path in enumerate(model_files):
        result = subprocess.run([sys.executable, "-c", CHECK, str(path)], capture_output=True, text=True,
                                check=True, env={**os.environ, "GLOG_v": "3"})
        parameters = json.loads(result.stdout.strip().splitlines()[-1])
        assert len(parameters) == 1, parameters
        assert parameters[0]["dims"] == [96 // rank_size, 16]
        assert np.allclose(parameters[0]["values"], 0.5)
        group_config = json.loads((path.parent / "group_config.json").read_text())
        assert group_config["rank"] == rank and group_config["rank_size"] == rank_size
        assert group_config["inputs"] == [{"name": "x", "dtype": "float32", "shape": [128, 96]}]
    table = json.loads((tmp_path / f"rank_table_{rank_size}pcs.json").read_text())
    ranks = [int(d["rank_id"]) for s in table["server_list"] for d in s["device"]]
    assert sorted(ranks) == list(range(rank_size))
