"""`zmserve serve`: the broker and one worker in one process and one loop.

On one machine the broker is a hop that costs a process wake-up and a copy each way (docs/BENCHMARKS.md). Here
the broker hands a request to the worker with a function call, already decoded, and the worker hands the reply
back the same way, with its request id; both keep their own rules unchanged, and the broker still accepts other
workers on `--worker-bind` if one is given. Clients cannot tell the difference: they talk to the same client ROUTER.
"""

from __future__ import annotations

from zmserve.loop import run_loop
from zmserve_services.broker.broker import Broker, InProcessWorker
from zmserve_services.worker.worker import InProcessBroker, Worker

IN_PROCESS_WORKER = b"\x00in-process-worker"
"""The broker's name for the worker in its own process (a ROUTER never generates an identity starting with 0)."""


class Colocated:
    def __init__(self, broker: Broker, worker: Worker) -> None:
        if worker.broker is not None:
            raise ValueError("the colocated worker must be configured without a broker address")
        self.broker, self.worker = broker, worker
        broker.attach_in_process_worker(IN_PROCESS_WORKER, InProcessWorker(worker.take_request, worker.process_broker))
        worker.attach_in_process_broker(InProcessBroker(
            lambda client, request_id, code, frames: broker.take_in_process_reply(IN_PROCESS_WORKER, client,
                                                                                  request_id, code, frames),
            lambda frames: broker.process_worker([IN_PROCESS_WORKER, *frames]),
            lambda keys: broker.take_in_process_started(IN_PROCESS_WORKER, keys)))
        self.stop_event = worker.stop_event
        """The worker's: a drained worker ends the loop, and the broker with it."""

    def run(self) -> None:
        run_loop([self.broker, self.worker], self.stop_event)  # the worker shuts down first, through the broker

    def stop(self) -> None:
        self.stop_event.set()

    def drain(self) -> None:
        """SIGTERM: the worker drains (the broker answers new requests as for a worker that is not ready), then
        both stop."""
        self.worker.drain()
