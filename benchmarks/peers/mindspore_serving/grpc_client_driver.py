"""Run by the MindSpore Serving peer's Python 3.9 (grpc_peer.run_driver): MindSpore Serving 2.0.2's own client,
`mindspore_serving.client.Client`, against a gRPC address, writing what it returned as a pickle.

    python grpc_client_driver.py OUTPUT cases ADDRESS CASES_DIR
        every request of CASES_DIR/ms_grpc_cases.py through `Client.infer`, and the first through `infer_async`:
        [(case name, what infer returned, or {"exception": text})]
    python grpc_client_driver.py OUTPUT latency ADDRESS SERVABLE METHOD SHAPE COUNT
        COUNT sequential `infer` calls with ones of SHAPE (e.g. 128x96) as `x`: [seconds of each call]
    python grpc_client_driver.py OUTPUT throughput ADDRESS SERVABLE METHOD SHAPE CLIENTS SECONDS
        CLIENTS threads (one Client each) calling `infer` for SECONDS: {"calls": n, "errors": n, "seconds": s}
"""

import os
import pickle
import sys
import threading
import time

import numpy as np

from mindspore_serving.client import Client


def cases(address, cases_dir):
    import importlib.util  # the case list is a plain module of zmserve's tests: loaded from its file, by path

    spec = importlib.util.spec_from_file_location("ms_grpc_cases", f"{cases_dir}/ms_grpc_cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ms_grpc_cases"] = module  # its dataclasses look their module up while they are defined
    spec.loader.exec_module(module)
    CASES = module.CASES

    results = []
    for case in CASES:
        results.append((case.name, bounded(lambda c=case: Client(address, c.servable, c.method, c.version)
                                           .infer(c.instances))))
    first = CASES[0]
    future = Client(address, first.servable, first.method, first.version).infer_async(first.instances)
    results.append((first.name + "[infer_async]", future.result()))
    return results


CALL_LIMIT_S = 30.0
"""The client has no deadline of its own: a call unanswered this long is recorded as such."""


def bounded(call):
    """What `call()` returned, raised ({"exception": text}), or {"exception": "no answer ..."} after CALL_LIMIT_S
    (its thread is a daemon: the process exits without it)."""
    box = []

    def run():
        try:
            box.append(call())
        except Exception as error:  # the client raises RuntimeError for what it will not send
            box.append({"exception": f"{type(error).__name__}: {error}"})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(CALL_LIMIT_S)
    return box[0] if box else {"exception": f"no answer within {CALL_LIMIT_S:g} s"}


def ones(shape):
    return np.ones([int(d) for d in shape.split("x")], np.float32)


def latency(address, servable, method, shape, count):
    client = Client(address, servable, method)
    instance = {"x": ones(shape)}
    client.infer(instance)  # connect and warm up
    seconds = []
    for _ in range(int(count)):
        started = time.perf_counter()
        answer = client.infer(instance)
        seconds.append(time.perf_counter() - started)
        if not isinstance(answer, list) or "y" not in answer[0]:
            raise RuntimeError(f"a call failed: {str(answer)[:300]}")
    return seconds


def throughput(address, servable, method, shape, clients, duration):
    instance = {"x": ones(shape)}
    counts = []
    errors = []
    start = threading.Barrier(int(clients) + 1)
    stop_at = []

    def run():
        client = Client(address, servable, method)
        client.infer(instance)
        calls = failed = 0
        start.wait()
        while time.perf_counter() < stop_at[0]:
            answer = client.infer(instance)
            calls += 1
            failed += not (isinstance(answer, list) and "y" in answer[0])
        counts.append(calls)
        errors.append(failed)

    threads = [threading.Thread(target=run) for _ in range(int(clients))]
    for thread in threads:
        thread.start()
    stop_at.append(time.perf_counter() + 1e9)
    start.wait()
    began = time.perf_counter()
    stop_at[0] = began + float(duration)
    for thread in threads:
        thread.join()
    return {"calls": sum(counts), "errors": sum(errors), "seconds": time.perf_counter() - began}


def main():
    output, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    result = {"cases": cases, "latency": latency, "throughput": throughput}[mode](*args)
    with open(output, "wb") as stream:
        pickle.dump(result, stream, protocol=4)
    sys.stdout.flush()
    os._exit(0)  # a call left unanswered holds a thread of the client's channel


if __name__ == "__main__":
    main()
