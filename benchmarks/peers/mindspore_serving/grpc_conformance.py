"""zmserve's gateway against MindSpore Serving 2.0.2 over gRPC, through MindSpore Serving's own client: the same
requests to both, every difference printed.

    .venv/bin/python -m benchmarks.peers.mindspore_serving.grpc_conformance ../shared/peers/mindspore-serving

The peer path is relative to the repository root. Both sides serve the servable `conform` (the MatMul plus
echo/type_of/swap/fail, ms_rest_cases.py); the requests are `tests/services/gateway/ms_grpc_cases.py`, whose
zmserve answers the gRPC tests assert. Each request goes through `mindspore_serving.client.Client.infer` (the
first also through `infer_async`), run by the peer's Python (grpc_client_driver.py), once against each server.
For each request the script prints `same`, or both answers with the documented reason (docs/HTTP.md); a
difference without a documented reason is UNEXPLAINED, and the script exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.peers.mindspore_serving.grpc_peer import (
    CASES_DIR,
    DEFAULT_PEER,
    mindspore_serving_grpc,
    run_driver,
    zmserve_grpc,
)
from benchmarks.peers.mindspore_serving.rest_peer import peer_dir
from tests.services.gateway.ms_grpc_cases import CASES, SERVABLE, describe, same
from tests.services.gateway.ms_rest_cases import MINDSPORE_SERVING_CONFIG, ZMSERVE_CONFIG

SHOWN = 300
"""Characters of each answer printed with a difference."""


def shorten(value: object) -> str:
    text = describe(value)
    return text if len(text) <= SHOWN else text[:SHOWN] + f"... ({len(text)} chars)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", nargs="?", default=DEFAULT_PEER, help="the peer's folder, relative to the repo root")
    args = parser.parse_args()
    peer = peer_dir(args.peer)
    with tempfile.TemporaryDirectory(prefix="grpc_conformance_") as tmp:
        work = Path(tmp)
        (work / "peer").mkdir()
        (work / "zmserve").mkdir()
        with mindspore_serving_grpc(peer, work / "peer", SERVABLE, MINDSPORE_SERVING_CONFIG) as peer_server:
            theirs = dict(run_driver(peer, "cases", peer_server.url, str(CASES_DIR)))
        with zmserve_grpc(work / "zmserve", SERVABLE, ZMSERVE_CONFIG) as zmserve:
            ours = dict(run_driver(peer, "cases", zmserve.url, str(CASES_DIR)))
    expected = {case.name: case for case in CASES}
    same_count = explained = unexplained = 0
    for name, answer in ours.items():
        case = expected.get(name.removesuffix("[infer_async]"))
        assert case is not None, name
        peer_answer = theirs[name]
        lines = []
        if not same(answer, case.answer):
            lines.append(f"  zmserve does not give the answer its tests expect: {shorten(case.answer)}  [UNEXPLAINED]")
        if not same(answer, peer_answer):
            reason = ", ".join(case.differs) or "UNEXPLAINED"
            lines.append(f"  zmserve           {shorten(answer)}")
            lines.append(f"  mindspore_serving {shorten(peer_answer)}  [{reason}]")
        elif case.differs:
            lines.append(f"  the same answer, though the case says it differs ({', '.join(case.differs)}): "
                         "update ms_grpc_cases.py  [UNEXPLAINED]")
        if not lines:
            same_count += 1
            print(f"same      {name}")
            continue
        bad = any("UNEXPLAINED" in line for line in lines)
        unexplained += bad
        explained += not bad
        print(f"{'DIFFERS ' if bad else 'differs '}  {name}  {case.method} {describe(case.instances)[:80]}")
        print("\n".join(lines))
    print(f"\n{len(ours)} requests: {same_count} same, {explained} differ for documented reasons, "
          f"{unexplained} differ UNEXPLAINED")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
