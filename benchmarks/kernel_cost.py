"""What one exported graph call costs in MindSpore 2.10 on CPU, by kernel count, kernel kind and size, setting and
call path (issue 23, step 1; results in docs/BENCHMARKS.md "Per-kernel cost").

Every variant is a small Cell exported with `ms.export` and loaded back as `nn.GraphCell(ms.load(...))`, the way
an agent loads a shard. Most variants are the seed's MatMul+Neg (x[128,96] @ W[96,16]) plus ONE extra op whose
math is an identity (a full-axis slice, a no-op reshape, a transpose pair, ...), so `variant - plain` is that op's
cost. Chains (N x Sin, N x 16x16 MatMul) give the per-kernel slope; square MatMuls the size curve.

The parent exports the graphs once, then starts one child process per setting (graph-kernel fusion, jit level,
thread count, runtime environment variables) and alternates them for `--rounds` rounds; inside a child every
variant is timed in turn, so ratios are taken within minutes of each other on this shared machine.

    .venv/bin/python -m benchmarks.kernel_cost                     # everything, 2 rounds (~3 min on 2 cores)
    .venv/bin/python -m benchmarks.kernel_cost --only graphs --calls 2000
    .venv/bin/python -m benchmarks.kernel_cost --only graphs --variants plain,dense_bias,matmul_bias

One JSON line per (round, setting, variant): p50/p90 µs per call (numpy in -> numpy out unless the variant's
`path` says otherwise) and the 1-minute load average when the child started.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
X_SHAPE, W_SHAPE = (128, 96), (96, 16)

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "threads1": {"context": {"runtime_num_threads": 1}},
    "jit_O1": {"context": {"jit_config": {"jit_level": "O1"}}},
    "graph_kernel": {"context": {"enable_graph_kernel": True}},
    "one_core": {"affinity": [0]},
    "runtime_no_pipeline": {"env": {"MS_DEV_RUNTIME_CONF": "pipeline:False"}},
    "runtime_no_inline": {"env": {"MS_DEV_RUNTIME_CONF": "inline:False"}},
}
"""Child processes: context kwargs set before loading, the CPU affinity, or environment variables set before
importing MindSpore. MS_DEV_RUNTIME_CONF's keys `pipeline` and `inline` are strings of the 2.10 wheel's runtime
libraries (libmindspore_ms_backend.so, libmindspore_runtime_utils.so); graph-kernel fusion needs a kernel build
service the CPU wheel lacks (its row records the error)."""

SETTING_VARIANTS = ["plain", "full_slice", "sin_x16", "matmul_256"]
"""The subset each non-default setting times: the base, the pathological op, the per-kernel slope, a real MatMul."""


def variants() -> dict[str, tuple[Callable[[], Any], tuple[int, ...]]]:
    """name -> (Cell factory, input shape). Built lazily: MindSpore is imported only by the exporting parent."""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops

    def weight(shape: tuple[int, ...], name: str = "w") -> Parameter:
        return Parameter(Tensor(np.full(shape, 0.5, np.float32)), name=name)

    strided, slice_op, concat = ops.StridedSlice(), ops.Slice(), ops.Concat(axis=1)
    indices = Tensor(np.arange(X_SHAPE[0], dtype=np.int32))

    class Pre(nn.Cell):
        """The one op under test, chosen by `kind` (a constant, so graph compilation keeps only its branch)."""

        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind

        def construct(self, x):
            if self.kind == "full_slice":
                return x[:, 0:96]
            if self.kind == "full_slice_ellipsis":
                return x[..., 0:96]
            if self.kind == "half_slice":
                return x[:, 0:48]
            if self.kind == "strided_slice_full":
                return strided(x, (0, 0), (128, 96), (1, 1))
            if self.kind == "slice_op_full":
                return slice_op(x, (0, 0), (128, 96))
            if self.kind == "reshape_noop":
                return ops.reshape(x, X_SHAPE)
            if self.kind == "transpose_pair":
                return ops.transpose(ops.transpose(x, (1, 0)), (1, 0))
            if self.kind == "cast_same":
                return ops.cast(x, ms.float32)
            if self.kind == "cast_f16_roundtrip":
                return ops.cast(ops.cast(x, ms.float16), ms.float32)
            if self.kind == "split_concat":
                return concat((x[:, 0:48], x[:, 48:96]))
            if self.kind == "gather_rows":
                return ops.gather(x, indices, 0)
            if self.kind == "expand_squeeze":
                return ops.squeeze(ops.expand_dims(x, 0), 0)
            return x + 0.0

    class MatMulNeg(nn.Cell):
        """neg(pre(x) @ W): `pre` is the one op under test (identity math unless said)."""

        def __init__(self, pre: str | None = None, rows: int = W_SHAPE[0], functional: bool = False) -> None:
            super().__init__()
            self.w = weight((rows, W_SHAPE[1]))
            self.functional = functional
            self.mm = ops.MatMul()
            self.neg = ops.Neg()
            self.pre = Pre(pre) if pre is not None else None

        def construct(self, x):
            if self.pre is not None:
                x = self.pre(x)
            if self.functional:
                return self.neg(ops.matmul(x, self.w))
            return self.neg(self.mm(x, self.w))

    class Chain(nn.Cell):
        def __init__(self, count: int, matmul: bool) -> None:
            super().__init__()
            self.count = count
            self.w = weight((16, 16))
            self.mm = ops.MatMul() if matmul else None
            self.sin = ops.Sin()

        def construct(self, x):
            for _ in range(self.count):
                x = self.mm(x, self.w) if self.mm is not None else self.sin(x)
            return x

    class Square(nn.Cell):
        def __init__(self, size: int) -> None:
            super().__init__()
            self.w = weight((size, size))
            self.mm = ops.MatMul()

        def construct(self, x):
            return self.mm(x, self.w)

    class Fused(nn.Cell):
        """One op against the kernels it replaces: Dense vs MatMul + bias Add (16x384 @ 384x1536), the LayerNorm
        kernel vs its 7-kernel explicit form (16x1024), the GeLU kernel vs the 8-kernel tanh form (16x4096)."""

        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind
            self.w = weight((384, 1536), "w")
            self.wt = weight((1536, 384), "wt")
            self.b = Parameter(Tensor(np.zeros(1536, np.float32)), name="b")
            self.gamma = Parameter(Tensor(np.ones(1024, np.float32)), name="gamma")
            self.beta = Parameter(Tensor(np.zeros(1024, np.float32)), name="beta")
            self.mm = ops.MatMul()
            self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=1e-5)

        def construct(self, x):
            if self.kind == "matmul_bias":
                return self.mm(x, self.w) + self.b
            if self.kind == "dense_bias":
                return ops.dense(x, self.wt, self.b)
            if self.kind == "layernorm_op":
                return self.norm(x, self.gamma, self.beta)[0]
            if self.kind == "layernorm_explicit":
                centered = x - ops.mean(x, -1, keep_dims=True)
                variance = ops.mean(centered * centered, -1, keep_dims=True)
                return centered * ops.rsqrt(variance + 1e-5) * self.gamma + self.beta
            if self.kind == "gelu_op":
                return ops.gelu(x, approximate="tanh")
            return 0.5 * x * (1.0 + ops.tanh(0.7978845608 * (x + 0.044715 * x * x * x)))

    class Flatten3d(nn.Cell):
        """[1, 128, 96] -> reshape (from the dynamic shape, as the MiniLM/big-model Linear does) -> MatMul -> Neg."""

        def __init__(self) -> None:
            super().__init__()
            self.w = weight(W_SHAPE)
            self.mm, self.neg = ops.MatMul(), ops.Neg()

        def construct(self, x):
            batch, length, features = ops.shape(x)
            return self.neg(self.mm(ops.reshape(x, (batch * length, features)), self.w))

    table: dict[str, tuple[Callable[[], Any], tuple[int, ...]]] = {
        "plain": (lambda: MatMulNeg(), X_SHAPE),
        "functional_matmul": (lambda: MatMulNeg(functional=True), X_SHAPE),
        "half_slice": (lambda: MatMulNeg("half_slice", rows=48), X_SHAPE),
        "flatten_3d_dynamic": (lambda: Flatten3d(), (1, *X_SHAPE)),
    }
    for kind in ("full_slice", "full_slice_ellipsis", "strided_slice_full", "slice_op_full", "reshape_noop",
                 "transpose_pair", "cast_same", "cast_f16_roundtrip", "split_concat", "gather_rows",
                 "expand_squeeze", "add_zero"):
        table[kind] = (lambda kind=kind: MatMulNeg(kind), X_SHAPE)
    for kind, shape in (("matmul_bias", (16, 384)), ("dense_bias", (16, 384)), ("layernorm_explicit", (16, 1024)),
                        ("layernorm_op", (16, 1024)), ("gelu_tanh_explicit", (16, 4096)), ("gelu_op", (16, 4096))):
        table[kind] = (lambda kind=kind: Fused(kind), shape)
    for count in (1, 4, 16, 32):
        table[f"sin_x{count}"] = (lambda count=count: Chain(count, matmul=False), (16, 16))
    for count in (1, 4, 16):
        table[f"matmul16_x{count}"] = (lambda count=count: Chain(count, matmul=True), (16, 16))
    for size in (16, 64, 128, 256, 512):
        table[f"matmul_{size}"] = (lambda size=size: Square(size), (size, size))
    return table


def export_all(out: Path, names: list[str]) -> None:
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    table = variants()
    for name in names:
        factory, shape = table[name]
        ms.export(factory(), ms.Tensor(np.ones(shape, np.float32)), file_name=str(out / name), file_format="MINDIR")
    (out / "shapes.json").write_text(json.dumps({name: table[name][1] for name in names}))


def time_calls(call: Callable[[], Any], calls: int) -> dict[str, float]:
    for _ in range(min(50, calls)):
        call()
    samples = np.empty(calls)
    for i in range(calls):
        started = time.perf_counter()
        call()
        samples[i] = time.perf_counter() - started
    return {"p50_us": round(float(np.percentile(samples, 50)) * 1e6, 1),
            "p90_us": round(float(np.percentile(samples, 90)) * 1e6, 1)}


def child(out: Path, setting: str, names: list[str], calls: int, with_paths: bool) -> None:
    """Load every variant under `setting` and time them in turn (twice, so a drift shows as disagreement)."""
    if "affinity" in SETTINGS[setting]:
        os.sched_setaffinity(0, SETTINGS[setting]["affinity"])
    from zmserve.collective import ShardModel, import_mindspore

    ms = import_mindspore()  # as an agent does: graph mode, CPU
    ms.set_context(**SETTINGS[setting].get("context", {}))
    shapes = json.loads((out / "shapes.json").read_text())
    cells = {name: ms.nn.GraphCell(ms.load(str(out / f"{name}.mindir"))) for name in names}
    inputs = {name: np.ones(shapes[name], np.float32) for name in names}
    load = float(Path("/proc/loadavg").read_text().split()[0])
    paths = call_paths(ms, cells["plain"], inputs["plain"], ShardModel) if with_paths and "plain" in cells else {}
    for inner in range(2):
        for name in names:
            row = {"setting": setting, "variant": name, "inner": inner, "load": load, "path": "Tensor->asnumpy"}
            call = lambda cell=cells[name], x=inputs[name]: cell(ms.Tensor(x)).asnumpy()  # noqa: E731
            print(json.dumps({**row, **time_calls(call, calls)}), flush=True)
        for path, call in paths.items():
            row = {"setting": setting, "variant": "plain", "inner": inner, "load": load, "path": path}
            print(json.dumps({**row, **time_calls(call, calls)}), flush=True)


def call_paths(ms: Any, cell: Any, x: np.ndarray, shard_model: Any) -> dict[str, Callable[[], Any]]:
    """Ways to call one loaded graph: input conversion, output conversion, and the agent's own path."""
    reused = ms.Tensor(x)
    shard = shard_model(cell)
    return {
        "from_numpy->asnumpy": lambda: cell(ms.Tensor.from_numpy(x)).asnumpy(),
        "reused_tensor->asnumpy": lambda: cell(reused).asnumpy(),
        "reused_tensor->tensor": lambda: cell(reused),
        "ShardModel.run (agent path)": lambda: shard.run([x]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per variant per inner round")
    parser.add_argument("--only", choices=["graphs", "settings"], default=None)
    parser.add_argument("--child", nargs=2, metavar=("DIR", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--variants", default="", help="comma list: only these variants (default: all)")
    parser.add_argument("--paths", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.variants.split(","), args.calls, args.paths)
        return
    env = {**os.environ, "GLOG_v": "3"}
    with tempfile.TemporaryDirectory(prefix="kernel_cost_") as tmp:
        out = Path(tmp)
        names = args.variants.split(",") if args.variants else list(variants())
        export_all(out, names)
        settings = ["default"] if args.only == "graphs" else list(SETTINGS)
        if args.only == "settings":
            names = SETTING_VARIANTS
        for round_ in range(args.rounds):
            order = settings if round_ % 2 == 0 else settings[::-1]
            for setting in order:
                subset = names if setting == "default" else [n for n in SETTING_VARIANTS if n in names]
                command = [sys.executable, "-m", __spec__.name, "--child", tmp, setting, "--variants", ",".join(subset),
                           "--calls", str(args.calls)] + (["--paths"] if setting == "default" else [])
                done = subprocess.run(command, capture_output=True, text=True,
                                      env={**env, **SETTINGS[setting].get("env", {})})
                for line in done.stdout.splitlines():
                    if line.startswith("{"):
                        print(json.dumps({"round": round_, **json.loads(line)}), flush=True)
                if done.returncode != 0:
                    error = [line for line in done.stderr.splitlines() if "Error" in line][-1:]
                    print(json.dumps({"round": round_, "setting": setting, "error": error}), flush=True)


if __name__ == "__main__":
    main()
