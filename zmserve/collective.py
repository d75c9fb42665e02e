"""Running a sharded model on MindSpore's CPU collectives: the scheduler, joining a group, the shard itself.

Every process that forms or joins a group comes through here: the worker's per-stage schedulers
(`StageGroup.start_scheduler`), the agents (`ShardRunner`), `zmserve bench run --direct` and the tests' runners.

A group forms around a scheduler, a process of its own started with `MS_ROLE=MS_SCHED` whose `init()` blocks
until every member has joined and later left (`start_scheduler`, which runs this module). Members set the
environment of the dynamic-cluster launch and call `init()` (`join_group`). Node ids are numeric, so each member
gets the rank it is told regardless of start order. The retry interval is cut from MindSpore's default so a
group forms in seconds, not tens of seconds. A loaded shard's graph contains collectives, so it may only be
called once its process is in the group (outside one, MindSpore segfaults).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zmserve.protocol import TensorSpec
from zmserve.standby import STANDBY_FLAG, activate, wait_for_activation
from zmserve.supervision import die_with_parent

if TYPE_CHECKING:
    from zmserve.collective_tls import CollectiveTls

SCHEDULER_ROLE = "MS_SCHED"
MEMBER_ROLE = "MS_WORKER"


def group_environment(role: str, scheduler_host: str, scheduler_port: int, group_size: int,
                      node_id: int | None = None) -> dict[str, str]:
    """The environment of a scheduler (node_id None) or of member `node_id` of a group of `group_size`."""
    env = {
        "MS_ROLE": role,
        "MS_SCHED_HOST": scheduler_host,
        "MS_SCHED_PORT": str(scheduler_port),
        "MS_WORKER_NUM": str(group_size),
        "MS_RETRY_INTERVAL_LOWER": "1",
        "MS_RETRY_INTERVAL_UPPER": "1",
        "GLOG_v": os.environ.get("GLOG_v", "3"),
    }
    if node_id is not None:
        env["MS_NODE_ID"] = str(node_id)
    return env


def start_scheduler(host: str, port: int, group_size: int, tls: CollectiveTls | None = None,
                    **popen_kwargs: Any) -> subprocess.Popen:
    """A scheduler process for a group of `group_size` on host:port; it dies with this process. With `tls` the
    group runs MindSpore's TLS (zmserve/collective_tls.py). `popen_kwargs` go to Popen (an `env` given there is
    the base the group variables are added to; stdout defaults to /dev/null)."""
    from zmserve.collective_tls import ENVIRONMENT

    base = popen_kwargs.pop("env", None)
    env = {**(os.environ if base is None else base), **group_environment(SCHEDULER_ROLE, host, port, group_size)}
    env.pop(ENVIRONMENT, None)
    if tls is not None:
        env[ENVIRONMENT] = str(tls.folder)
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    popen_kwargs.setdefault("stdout", subprocess.DEVNULL)
    return subprocess.Popen([sys.executable, "-m", "zmserve.collective"], env=env, preexec_fn=die_with_parent,
                            **popen_kwargs)


def start_standby_scheduler(**popen_kwargs: Any) -> subprocess.Popen:
    """A scheduler process that imports MindSpore now and waits (zmserve/standby.py); `activate_scheduler` makes
    it the scheduler of a group, at once."""
    popen_kwargs.setdefault("stdout", subprocess.DEVNULL)
    return subprocess.Popen([sys.executable, "-m", "zmserve.collective", STANDBY_FLAG], stdin=subprocess.PIPE,
                            preexec_fn=die_with_parent, **popen_kwargs)


def activate_scheduler(process: subprocess.Popen, host: str, port: int, group_size: int,
                       tls: CollectiveTls | None = None) -> bool:
    """Make a standby scheduler the scheduler of a group of `group_size` on host:port (with `tls`, over
    MindSpore's TLS); False if it is gone."""
    from zmserve.collective_tls import ENVIRONMENT

    environment = group_environment(SCHEDULER_ROLE, host, port, group_size)
    if tls is not None:
        environment[ENVIRONMENT] = str(tls.folder)
    return activate(process, json.dumps(environment))


@functools.cache
def import_mindspore() -> Any:
    """MindSpore set up for CPU graph mode (once per process: the device cannot be set twice)."""
    os.environ.setdefault("GLOG_v", "3")
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    return ms


def join_group(scheduler_host: str, scheduler_port: int, group_size: int, node_id: int,
               tls: CollectiveTls | None = None) -> None:
    """Become member `node_id` of the group around scheduler_host:scheduler_port; blocks until the group is
    whole (MindSpore holds the GIL meanwhile: a caller that needs a deadline sets one outside Python). With `tls`,
    over MindSpore's TLS, as the group's scheduler must be."""
    os.environ.update(group_environment(MEMBER_ROLE, scheduler_host, scheduler_port, group_size, node_id))
    import_mindspore()
    if tls is not None:
        tls.apply()
    from mindspore.communication import init

    init()


class ShardModel:
    """One rank's MindIR as a GraphCell, called with numpy arrays and answering numpy arrays.

    The first call with inputs of a new (shape, dtype) goes through `GraphCell.__call__`, which checks the
    arguments and compiles the graph for them; later calls with the same shapes run that compiled graph directly
    (`run_compiled`), skipping ~130 µs of Python argument handling per call (docs/BENCHMARKS.md)."""

    def __init__(self, cell: Any) -> None:
        self.ms = import_mindspore()
        self.cell = cell
        self.compiled: dict[tuple[tuple[tuple[int, ...], str], ...], str] = {}
        """Input signature -> the graph phase the first call with it compiled."""

    @classmethod
    def load(cls, model_file: str | Path) -> ShardModel:
        ms = import_mindspore()
        return cls(ms.nn.GraphCell(ms.load(str(model_file))))

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        arrays = [np.asarray(value) for value in inputs]
        tensors = [self.tensor(array) for array in arrays]
        signature = tuple((array.shape, array.dtype.str) for array in arrays)
        phase = self.compiled.get(signature)
        if phase is None:
            returned = self.cell(*tensors)
            if (phase := compiled_phase(self.cell)) is not None:
                self.compiled[signature] = phase
        else:
            returned = run_compiled(phase, tensors)
        outputs = returned if isinstance(returned, tuple | list) else (returned,)
        return [output.asnumpy() for output in outputs]

    def tensor(self, value: Any) -> Any:
        """A MindSpore tensor over the array's own memory when it is a C-contiguous numeric array (no copy of
        the input), else a copy."""
        array = np.asarray(value)
        if array.flags.c_contiguous and array.dtype.kind in "biuf":
            return self.ms.Tensor.from_numpy(array)
        return self.ms.Tensor(array)

    def warm_up(self, input_specs: Sequence[TensorSpec]) -> None:
        """One call on zeros of the signature's shapes (a dynamic dimension, -1, as 1), so the first real call
        does not pay for compiling the graph."""
        self.run([np.zeros([d if d >= 0 else 1 for d in spec.shape], dtype=spec.dtype) for spec in input_specs])


def compiled_phase(cell: Any) -> str | None:
    """The phase under which MindSpore compiled `cell` for the arguments of its last call (its graph executor's
    key), or None if this MindSpore does not expose it. MindSpore-private: kept to this function and
    `run_compiled`, both checked against the public call by tests/zmserve/test_collective.py."""
    try:
        from mindspore.graph.api import _cell_graph_executor, _real_phase

        phase = _real_phase(cell.phase, cell)
        return phase if _cell_graph_executor.has_compiled(phase) else None
    except (ImportError, AttributeError):
        return None


def run_compiled(phase: str, tensors: list[Any]) -> Any:
    """Run a graph compiled under `phase` (by a checked call with inputs of the same shapes and dtypes)."""
    from mindspore.graph.api import _cell_graph_executor

    return _cell_graph_executor._graph_executor(tuple(tensors), phase)


def run_scheduler(argv: list[str]) -> None:
    """A scheduler process: the group's MS_* environment (and the TLS folder) was set by the parent
    (start_scheduler), or comes on stdin once MindSpore is imported (start_standby_scheduler)."""
    from mindspore.communication import init  # the slow part: MindSpore's import

    from zmserve.collective_tls import from_environment

    if argv[:1] == [STANDBY_FLAG]:
        line = wait_for_activation()
        if line is None:
            return
        os.environ.update(json.loads(line))
    if (scheduler_tls := from_environment()) is not None:
        scheduler_tls.apply()
    init()


if __name__ == "__main__":
    run_scheduler(sys.argv[1:])
