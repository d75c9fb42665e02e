"""Steady load for the replica and rollout tests: client threads, each with its own Client, calling the MatMul one
request at a time with a random x, and keeping every answer: which weight's result it is (each model version has
its own W value), or the error code, or "wrong".

Imported by a test that runs it in its own process (`SteadyLoad`); or run as a script inside a network namespace
(`python steady_load.py ADDRESS --weights 0.5`), where it prints one JSON line of counts each 0.2 s and, when
SIGTERMed, one JSON line with every outcome.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from zmserve.client import Client, ClientError


@dataclass(frozen=True)
class Outcome:
    sent: float
    answered: float
    what: str
    """"w=<weight>" for a correct result of the version with that weight, "wrong", or the error code."""


def classify(x: np.ndarray, y: np.ndarray, weights: tuple[float, ...]) -> str:
    for weight in weights:
        expected = -(x.astype(np.float64) @ np.full((96, 16), weight))
        if y.shape == expected.shape and np.allclose(y, expected, atol=1e-3, rtol=1e-5):
            return f"w={weight:g}"
    return "wrong"


class SteadyLoad:
    def __init__(self, address: str, weights: tuple[float, ...], clients: int = 4, pause: float = 0.01,
                 timeout: float = 30.0, retry: str | None = None, servable: str = "matmul") -> None:
        self.address, self.weights, self.clients, self.pause = address, weights, clients, pause
        self.timeout, self.retry, self.servable = timeout, retry, servable
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(seed,), daemon=True) for seed in range(clients)]

    def start(self) -> SteadyLoad:
        for thread in self.threads:
            thread.start()
        return self

    def run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(self.address, self.servable, "predict", retry=self.retry) as client:
            while not self.stopping.is_set():
                x = rng.standard_normal((128, 96)).astype(np.float32)
                sent = time.monotonic()
                try:
                    what = classify(x, client.infer({"x": x}, timeout=self.timeout)[0]["y"], self.weights)
                except ClientError as error:
                    what = str(error.code)
                with self.lock:
                    self.outcomes.append(Outcome(sent, time.monotonic(), what))
                self.stopping.wait(self.pause)

    def counts(self) -> Counter:
        with self.lock:
            return Counter(outcome.what for outcome in self.outcomes)

    def first(self, what: str) -> Outcome | None:
        """The earliest answered outcome of this kind."""
        with self.lock:
            return min((o for o in self.outcomes if o.what == what), key=lambda o: o.answered, default=None)

    def stop(self) -> list[Outcome]:
        """Stop sending, wait for every thread's last answer, and return every outcome."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=self.timeout + 5)
        assert not any(thread.is_alive() for thread in self.threads), "a client thread is still waiting"
        return sorted(self.outcomes, key=lambda o: o.sent)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--retry", default=None)
    args = parser.parse_args()
    load = SteadyLoad(args.address, tuple(args.weights), args.clients, retry=args.retry).start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    while not stopped.wait(0.2):
        print(json.dumps({"counts": load.counts()}), flush=True)
    print(json.dumps({"outcomes": [asdict(o) for o in load.stop()]}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
