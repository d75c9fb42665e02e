"""Why `zmserve agent --memory-limit` uses a cgroup: what RLIMIT_AS and RLIMIT_DATA do to a MindSpore process.

    .venv/bin/python -m benchmarks.memory_limit_probe [--limits 1.0,1.2,1.5,2,4]

Exports the 6 KB residual MLP (examples/mlp_pipeline, rank_size 1), then for each resource and limit (GiB) runs a
fresh process that sets the limit, imports MindSpore, loads the MindIR and calls it once, and prints one JSON
line: whether it worked, the error, and the process's VmPeak (address space), VmHWM (peak RSS) and VmData. An
rlimit that bounds address space is no memory limit when a process holds 430 MB but reserves 2.3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.benchlib import REPO, emit

PROBE = """
import json, os, resource, sys
kind, gib, model = sys.argv[1], float(sys.argv[2]), sys.argv[3]
limit = int(gib * 2**30)
resource.setrlimit(getattr(resource, "RLIMIT_" + kind), (limit, limit))
result = {"rlimit": kind, "gib": gib}
try:
    import numpy as np
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    cell = ms.nn.GraphCell(ms.load(model))
    cell(ms.Tensor(np.zeros((16, 64), np.float32))).asnumpy()
    result["ok"] = True
except BaseException as error:
    result.update(ok=False, error=f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:120]}")
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
result.update({key: int(status[key].split()[0]) // 1024 for key in ("VmPeak", "VmHWM", "VmData")})
print(json.dumps(result), flush=True)
os._exit(0)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limits", default="1.0,1.2,1.5,2,4", help="GiB, comma separated")
    args = parser.parse_args()
    env = {**os.environ, "GLOG_v": "3"}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(REPO / "examples" / "mlp_pipeline" / "export_model.py"), "--rank-size",
                        "1", "--stage-size", "1", "--output-dir", tmp], check=True, capture_output=True, env=env)
        model = str(Path(tmp) / "device0" / "mlp.mindir")
        script = Path(tmp) / "probe.py"
        script.write_text(PROBE)
        for kind in ("AS", "DATA"):
            for gib in args.limits.split(","):
                done = subprocess.run([sys.executable, str(script), kind, gib, model], capture_output=True,
                                      text=True, env=env, timeout=300)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                row = json.loads(lines[-1]) if lines else {"rlimit": kind, "gib": float(gib), "ok": False,
                                                           "error": f"exit {done.returncode}"}
                emit({"row": "rlimit", **{k.replace("Vm", "vm_").lower() + ("_mib" if k.startswith("Vm") else ""): v
                                          for k, v in row.items()}})


if __name__ == "__main__":
    main()
