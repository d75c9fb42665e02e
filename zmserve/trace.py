"""Per-request timelines: where a sampled request spends its time, hop by hop, measured (issue 23).

A traced request carries a list of (hop, nanoseconds) stamps in its messages' optional `trace` field: the client
starts it (`client_send`), the broker, the worker and the agent append theirs as the request passes (the broker
re-encodes a traced header, the only per-hop cost a traced request pays that others do not), and the Reply brings
the list back, where the client adds `client_receive`. An untraced request carries None and costs one
`is not None` test per hop. The clock is `time.monotonic_ns()`: CLOCK_MONOTONIC, shared by every process of one
host, so stamps from different processes subtract; across hosts the spans that cross hosts are meaningless.

`zmserve bench run --trace N` traces one request in N and writes each traced record's `spans` (µs between
consecutive stamps, keyed "from>to"); `zmserve bench report` then prints the per-span median.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

Stamps = list[tuple[str, int]]
"""[(hop, time.monotonic_ns()), ...] in the order the request passed the hops."""

CLIENT_SEND, CLIENT_RECEIVE = "client_send", "client_receive"
BROKER_IN, BROKER_OUT = "broker_in", "broker_out"
WORKER_IN, WORKER_OUT, WORKER_RESULT, WORKER_REPLY = "worker_in", "worker_out", "worker_result", "worker_reply"
AGENT_IN, MODEL_START, MODEL_END, AGENT_OUT = "agent_in", "model_start", "model_end", "agent_out"


def now() -> int:
    return time.monotonic_ns()


def stamp(stamps: Stamps | None, hop: str, at: int | None = None) -> None:
    """Append `hop` (at `at`, default now) to a traced request's stamps; nothing for an untraced one (None)."""
    if stamps is not None:
        stamps.append((hop, now() if at is None else at))


def start(traced: bool) -> Stamps | None:
    """The stamps a new request carries: [client_send] when traced, else None."""
    return [(CLIENT_SEND, now())] if traced else None


def spans(stamps: Iterable[Sequence]) -> dict[str, float]:
    """µs between consecutive stamps, keyed "from>to" (a hop passed twice, e.g. two pipeline stages, gets a
    numbered key)."""
    result: dict[str, float] = {}
    previous: tuple[str, int] | None = None
    for hop, at in stamps:
        if previous is not None:
            key = f"{previous[0]}>{hop}"
            number = 2
            while key in result:
                key = f"{previous[0]}>{hop}#{number}"
                number += 1
            result[key] = round((at - previous[1]) / 1000.0, 1)
        previous = (hop, at)
    return result


def finish(target: list | None, stamps: Stamps | None) -> None:
    """The client's end: a caller that asked for a trace (`target`, a list) gets the reply's stamps and
    `client_receive`; an untraced request or a reply without stamps leaves it as it was."""
    if target is not None and stamps is not None:
        target.extend(tuple(each) for each in stamps)
        target.append((CLIENT_RECEIVE, now()))


def restamp(message: Any, frames: list[Any], hop: str) -> list[Any]:
    """A traced message passing a hop that forwards frames as they came (the broker): stamp it and re-encode its
    header frame; the value frames go on untouched."""
    from zmserve.protocol import encode

    stamp(message.trace, hop)
    return [encode(message), *frames[1:]]


def span_summary(all_spans: Iterable[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per span over the traced records: how many, and the median and p90 in µs (spans in first-seen order)."""
    values: dict[str, list[float]] = {}
    for each in all_spans:
        for key, micros in each.items():
            values.setdefault(key, []).append(micros)
    summary = {}
    for key, samples in values.items():
        ordered = sorted(samples)
        summary[key] = {"n": len(ordered), "p50_us": ordered[len(ordered) // 2],
                        "p90_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]}
    return summary
