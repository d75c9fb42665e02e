"""Summarise a `py-spy record -f raw` file: how busy the process was and which functions hold its samples.

    .venv/bin/python -m benchmarks.pyspy_summary FILE.raw [--seconds 8] [--rate 200]

Raw lines are `frame;frame;...;leaf COUNT` (idle samples excluded by py-spy), so samples / (seconds x rate) is the
busy fraction of one thread-second, and the leaf frames say where that time goes (C calls are charged to the
Python frame that made them). zmq_poll is not seen as idle by py-spy, so poll samples are reported apart as
waiting; frames on >= 90% of stacks (main loops, click) are left out of the inclusive list.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

WAITS = ("Poller.poll", "poll (zmq", "Queue.get", "Condition.wait", "Event.wait")
"""Leaf frames that are blocking waits py-spy does not recognise as idle (zmq_poll): reported apart."""
LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")


def function_of(frame: str) -> str:
    """`send_multipart (zmq/sugar/socket.py:123)` -> `send_multipart (zmq/sugar/socket.py)`."""
    return re.sub(r":\d+\)$", ")", frame.strip())


def summarize_raw(path: Path, seconds: float, rate: int, top: int = 8) -> dict[str, Any]:
    leaf: Counter[str] = Counter()
    caller_leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = waiting = 0
    for line in path.read_text().splitlines():
        match = LINE.match(line)
        if not match:
            continue
        count = int(match["count"])
        frames = [function_of(f) for f in match["stack"].split(";") if f.strip()]
        if not frames:
            continue
        total += count
        leaf[frames[-1]] += count
        if any(frames[-1].startswith(name) for name in WAITS):
            waiting += count
        elif len(frames) > 1:
            caller_leaf[f"{frames[-2].split(' (')[0]} > {frames[-1]}"] += count
        for frame in set(frames):
            inclusive[frame] += count
    share = lambda counter: [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)]  # noqa: E731
    inclusive = Counter({name: n for name, n in inclusive.items() if n < 0.9 * total})
    return {"samples": total, "sampled_fraction_of_one_thread": round(total / (seconds * rate), 2),
            "waiting_in_poll_pct": round(100 * waiting / max(total, 1), 1),
            "top_self_pct": share(leaf), "top_caller_self_pct": share(caller_leaf),
            "top_inclusive_pct": share(inclusive)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rate", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(summarize_raw(args.file, args.seconds, args.rate), indent=1))


if __name__ == "__main__":
    main()
