"""How a process joins a MindSpore CPU collective group: the environment of the dynamic-cluster launch.

MindSpore reads these variables in `mindspore.communication.init()`. Node ids are numeric, so each process gets
the rank it is told regardless of start order. The retry interval is cut from MindSpore's default so a group
forms in seconds, not tens of seconds.
"""

from __future__ import annotations

import os

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
