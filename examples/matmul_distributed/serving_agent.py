"""Start the 8 agents of this machine (reference: serving_agent.py)."""

import os
import sys

from zmserve.server import distributed


def start_agents() -> None:
    here = os.path.dirname(os.path.realpath(sys.argv[0]))
    model_files = [os.path.join(here, f"model/device{i}/matmul.mindir") for i in range(8)]
    group_configs = [os.path.join(here, f"model/device{i}/group_config.json") for i in range(8)]
    sys.exit(distributed.startup_agents(distributed_address="127.0.0.1:6200", model_files=model_files,
                                        group_config_files=group_configs, agent_start_port=7000,
                                        agent_ip=None, rank_start=None))


if __name__ == "__main__":
    start_agents()
