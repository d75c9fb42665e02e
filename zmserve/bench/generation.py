"""Generation mode (`zmserve bench --prompts FILE` or `--random-prompts`): each request streams a generation through
the client's streaming API, and its record adds the completion tokens, the time to first token (TTFT) and every
inter-token gap (ITL).

Times are taken where the client's IO thread receives each PARTIAL (`InferStream.arrivals`), from just before the
send, in the closed loop and the open loop alike: TTFT is the first partial's arrival, each ITL gap the time between
two partials in a row (a partial may carry several tokens; the gpt servable sends one). A request answered with no
partial (a method that does not stream) has its whole latency as TTFT when it produced tokens.

Prompt lines are JSON objects: `{"prompt": "...", "max_tokens": 32}` plus any sampling value of
`zmserve.sampling.SamplingParams` (`temperature`, `top_k`, `top_p`, `frequency_penalty`, `presence_penalty`,
`seed`), and optionally `servable`/`method`.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from zmserve.bench.errors import BenchError
from zmserve.bench.lines import json_object, parse_lines
from zmserve.bench.load import ServiceLoad, failure
from zmserve.bench.records import OK, Record
from zmserve.bench.requests import RequestSpec, payload_bytes
from zmserve.client import SAMPLING_DTYPES, InferStream, generation_inputs

GENERATE_METHOD = "generate"
WORDS = ("the", "model", "serves", "tokens", "over", "zero", "queue", "stages", "agents", "shard", "a", "of",
         "and", "fast", "small", "river", "light", "green", "stone", "wind")
"""What random prompts are made of: plain words every tokenizer can encode."""


def read_prompts(lines: Iterable[str], source: str) -> list[RequestSpec]:
    """Prompt lines -> one RequestSpec each; a bad line fails with `source:line: why`."""
    specs = parse_lines(lines, source, prompt_request)
    if not specs:
        raise BenchError(f"{source}: no prompt lines")
    return specs


def prompt_request(line: str) -> RequestSpec:
    document = json_object(line, "a prompt line")
    unknown = sorted(set(document) - {"prompt", "servable", "method", *SAMPLING_DTYPES})
    if unknown:
        raise ValueError(f"unknown keys {unknown}; a prompt line has 'prompt', the sampling values "
                         f"{list(SAMPLING_DTYPES)} and optionally 'servable' and 'method'")
    sampling = {key: value for key, value in document.items() if key in SAMPLING_DTYPES}
    try:
        instance = generation_inputs(document.get("prompt"), **sampling)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise ValueError(str(error)) from None
    return RequestSpec(document.get("servable"), document.get("method"), [instance])


def prompt_lines(requests: list[RequestSpec]) -> list[str]:
    """The prompt lines that make these requests again (random prompts handed to --processes parts)."""
    lines = []
    for spec in requests:
        instance = spec.instances[0]
        document: dict[str, Any] = {name: np.asarray(instance[name]).item() for name in SAMPLING_DTYPES}
        document["prompt"] = instance["prompt"]
        if document["seed"] == -1:
            del document["seed"]
        document.update({key: value for key, value in (("servable", spec.servable), ("method", spec.method))
                         if value is not None})
        lines.append(json.dumps(document))
    return lines


def random_prompts(count: int, words: int, max_tokens: int, seed: int | None) -> list[RequestSpec]:
    """`count` prompts of `words` random words each (seeded), each asking for `max_tokens` greedy tokens."""
    rng = np.random.default_rng(seed)
    return [RequestSpec(None, None, [generation_inputs(" ".join(rng.choice(WORDS, words)), max_tokens=max_tokens)])
            for _ in range(count)]


class GenerationLoad(ServiceLoad):
    """`ServiceLoad` whose requests are streamed generations (closed and open loop alike)."""

    def call(self, number: int, client: Any, spec: RequestSpec) -> Record:
        send_time, started = time.time(), time.perf_counter()
        stream: InferStream = client.infer_stream(spec.instances[0], self.timeout)
        done = threading.Event()
        stream.future.add_done_callback(lambda _: done.set())
        done.wait()  # the client ends every request by its deadline
        return generation_record(number, send_time, started, time.perf_counter(), spec, stream)

    def _send_async(self, ticket: int) -> None:
        number, client, spec = self.request(ticket)
        send_time, started = time.time(), time.perf_counter()
        with self._lock:
            stream = client.infer_stream(spec.instances[0], self.timeout)
            self._outstanding[number] = (stream.future, send_time, started, spec)
        stream.future.add_done_callback(lambda _, n=number, s=stream: self._streamed(n, s))

    def _streamed(self, number: int, stream: InferStream) -> None:
        self._settle(number, lambda send_time, started, finished, spec:
                     generation_record(number, send_time, started, finished, spec, stream))


def generation_record(number: int, send_time: float, started: float, finished: float, spec: RequestSpec,
                      stream: InferStream) -> Record:
    """The record of an answered stream: tokens, TTFT and gaps from the partials' arrival times."""
    future = stream.future
    error = future.exception() if not future.cancelled() else None
    if error is not None or future.cancelled():
        return failure(number, send_time, finished - started, spec, error or Exception("cancelled"))
    outputs = future.result()[0]
    tokens = completion_tokens(outputs)
    arrivals = list(stream.arrivals)
    ttft = arrivals[0] - started if arrivals else (finished - started if tokens else None)
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    record = Record.measured(number, send_time, finished - started, OK, spec.bytes_out, payload_bytes([outputs]))
    return record.with_tokens(tokens, ttft, gaps)


def completion_tokens(outputs: dict[str, Any]) -> int:
    if "completion_tokens" in outputs:
        return int(outputs["completion_tokens"])
    return int(np.asarray(outputs.get("token_ids", [])).size)
