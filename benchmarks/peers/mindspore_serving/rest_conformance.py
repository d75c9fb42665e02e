"""zmserve's gateway against MindSpore Serving 2.0.2's REST server: the same requests to both, every difference
printed.

    .venv/bin/python -m benchmarks.peers.mindspore_serving.rest_conformance ../shared/peers/mindspore-serving

The peer path is relative to the repository root. Both sides serve the servable `conform` (the MatMul plus
echo/type_of/swap methods); the requests are `tests/services/gateway/ms_rest_cases.py`, whose zmserve answers the
gateway tests assert. For each request the script prints `same`, or each part that differs (HTTP status, body)
with both answers and the documented reason (docs/HTTP.md); a difference without a documented reason is
UNEXPLAINED, and the script exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.peers.mindspore_serving.rest_peer import (
    DEFAULT_PEER,
    mindspore_serving,
    peer_dir,
    post,
    zmserve_gateway,
)
from tests.services.gateway.ms_rest_cases import (
    CASES,
    MINDSPORE_SERVING_CONFIG,
    SERVABLE,
    STATUS,
    ZMSERVE_CONFIG,
    Case,
)

SHOWN = 240
"""Characters of each answer printed with a difference."""


def answer(url: str, case: Case) -> tuple[int, object]:
    status, raw = post(url, case.path, case.body, case.http_method)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def compare(case: Case, zmserve: tuple[int, object], peer: tuple[int, object]) -> list[str]:
    """One line per differing part, each marked with its documented reason or UNEXPLAINED."""
    lines = []
    if zmserve[0] != peer[0]:
        reason = STATUS if STATUS in case.differs else "UNEXPLAINED"
        lines.append(f"  status   zmserve {zmserve[0]}  mindspore_serving {peer[0]}  [{reason}]")
    if zmserve[1] != peer[1]:
        reasons = [r for r in case.differs if r != STATUS]
        reason = ", ".join(reasons) if reasons else "UNEXPLAINED"
        lines.append(f"  body     zmserve           {shorten(zmserve[1])}")
        lines.append(f"           mindspore_serving {shorten(peer[1])}  [{reason}]")
    if zmserve != (case.status, case.answer):
        lines.append(f"  zmserve does not give the answer its tests expect: {case.status} {shorten(case.answer)}"
                     "  [UNEXPLAINED]")
    return lines


def shorten(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= SHOWN else text[:SHOWN] + f"... ({len(text)} chars)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", nargs="?", default=DEFAULT_PEER, help="the peer's folder, relative to the repo root")
    args = parser.parse_args()
    peer = peer_dir(args.peer)
    with tempfile.TemporaryDirectory(prefix="rest_conformance_") as tmp:
        work = Path(tmp)
        (work / "peer").mkdir()
        (work / "zmserve").mkdir()
        with mindspore_serving(peer, work / "peer", SERVABLE, MINDSPORE_SERVING_CONFIG) as peer_server, \
                zmserve_gateway(work / "zmserve", SERVABLE, ZMSERVE_CONFIG) as zmserve:
            results = [(case, answer(zmserve.url, case), answer(peer_server.url, case)) for case in CASES]
    same = explained = unexplained = 0
    for case, zmserve, peer in results:
        lines = compare(case, zmserve, peer)
        if not lines:
            same += 1
            print(f"same      {case.name}")
            continue
        bad = any("UNEXPLAINED" in line for line in lines)
        unexplained += bad
        explained += not bad
        print(f"{'DIFFERS ' if bad else 'differs '}  {case.name}  {case.http_method} {case.path}")
        print("\n".join(lines))
    print(f"\n{len(results)} requests: {same} same, {explained} differ for documented reasons, "
          f"{unexplained} differ UNEXPLAINED")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
