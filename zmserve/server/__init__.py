"""The Python API of the server side, shaped like MindSpore Serving's `mindspore_serving.server`.

A reference `serving_server.py` ports by changing its imports only:

    from zmserve import server
    from zmserve.server import distributed
    distributed.start_servable(servable_dir, "matmul", rank_table_json_file="rank_table_8pcs.json",
                               version_number=1, distributed_address="127.0.0.1:6200")
    server.start_grpc_server("127.0.0.1:5500")      # MindSpore Serving's gRPC (its client) and the OIP's
    server.start_restful_server("127.0.0.1:1500")   # its RESTful scheme and the OIP over HTTP

(frontends.py: each starts a gateway in front of this process's broker, and the first starts that broker when the
script did not.) zmserve's own clients talk to the broker: `server.start_broker("127.0.0.1:5500")` instead.

Each call starts its service on a thread of this process and returns; the process then runs until SIGINT or
SIGTERM (a second one forces the exit). A service that fails ends the process with exit code 1.

A servable's Python stage raises `InvalidInput` (or TypeError, ValueError) when the request's input is wrong:
the caller gets INVALID_ARGUMENT with its message, not INTERNAL.
"""

from __future__ import annotations

from zmserve.endpoints import DEFAULT_BROKER_CLIENT_ADDRESS, DEFAULT_BROKER_WORKER_ADDRESS
from zmserve.security import PLAINTEXT, Security
from zmserve.servable import InvalidInput
from zmserve.server import distributed, register
from zmserve.server.frontends import SSLConfig, broker_started, start_grpc_server, start_restful_server
from zmserve.server.running import run_in_background, stop

__all__ = ["InvalidInput", "SSLConfig", "distributed", "register", "start_broker", "start_grpc_server",
           "start_restful_server", "stop"]


def start_broker(address: str = DEFAULT_BROKER_CLIENT_ADDRESS,
                 worker_address: str = DEFAULT_BROKER_WORKER_ADDRESS, security: Security = PLAINTEXT) -> None:
    """Start the client-facing broker: clients connect to `address`, workers to `worker_address`. `security`:
    CURVE (`Security.load(secret_key, {Domain.CLIENTS: folder, Domain.WORKERS: folder})`, docs/SECURITY.md)."""
    from zmserve_services.broker.broker import Broker

    run_in_background("broker", Broker(address, worker_address, security=security))
    broker_started(address)
