"""The drain rules (services/worker/drain.py) with no sockets: when a draining worker is done."""

from zmserve_services.worker.drain import Drain, DrainState


def test_nothing_happens_until_a_drain_is_requested() -> None:
    drain = Drain(timeout=10)
    assert not drain.begin(now=0) and drain.state is DrainState.SERVING
    assert drain.done(now=100, held=0, broker_reachable=True) is None


def test_done_when_the_broker_acknowledged_and_nothing_is_held() -> None:
    drain = Drain(timeout=10)
    drain.request()
    assert drain.begin(now=1) and drain.draining
    assert not drain.begin(now=2)  # once
    assert drain.done(now=2, held=0, broker_reachable=True) is None  # requests may still be on their way
    drain.acknowledged = True
    assert drain.done(now=3, held=2, broker_reachable=True) is None  # two held
    assert drain.done(now=4, held=0, broker_reachable=True) == "drained"
    assert drain.state is DrainState.DONE


def test_a_lost_broker_sends_nothing_more_so_no_ack_is_needed() -> None:
    drain = Drain(timeout=10)
    drain.request()
    drain.begin(now=0)
    assert drain.done(now=1, held=0, broker_reachable=False) == "drained"


def test_the_timeout_ends_a_drain_that_still_holds_requests() -> None:
    drain = Drain(timeout=5)
    drain.request()
    drain.begin(now=10)
    drain.acknowledged = True
    assert drain.done(now=14.9, held=3, broker_reachable=True) is None
    assert drain.done(now=15, held=3, broker_reachable=True) == "drain timeout (5 s)"


def test_timeout_zero_stops_at_once() -> None:
    drain = Drain(timeout=0)
    drain.request()
    drain.begin(now=0)
    assert drain.done(now=0, held=4, broker_reachable=True) == "no drain (drain timeout 0)"
