"""Start the client-facing broker and the distributed worker of the MatMul servable (reference: serving_server.py)."""

import os
import sys

from zmserve import server
from zmserve.server import distributed


def start() -> None:
    servable_dir = os.path.dirname(os.path.realpath(sys.argv[0]))
    rank_table = os.path.join(servable_dir, "rank_table_8pcs.json")
    distributed.start_servable(servable_dir, "matmul",
                               rank_table_json_file=rank_table if os.path.exists(rank_table) else None,
                               version_number=1,
                               distributed_address="127.0.0.1:6200",
                               wait_agents_time_in_seconds=0)
    server.start_broker("127.0.0.1:5500")


if __name__ == "__main__":
    start()
