"""The datastore keeps each endpoint's (requests waiting, load) current as its signals and epp's
counters change; a snapshot's ``queued_and_loads`` reads them and must say what computing them
from the snapshot's signals and counters says, whatever happened before."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.peers import PeerTotals
from epp.datastore.store import Datastore, Snapshot

ADDRESSES = [f"10.0.0.{i}:8000" for i in range(1, 9)]


def _computed(snapshot: Snapshot, endpoints: list[EndpointState]) -> tuple[list[float], list[float]]:
    """The same values from the signals and counters alone (a snapshot the datastore keeps none for)."""
    return replace(snapshot, queued_by=None, loads_by=None).queued_and_loads(endpoints)


def _signals(rng: random.Random) -> EngineSignals:
    return EngineSignals(waiting=float(rng.randrange(5)), running=float(rng.randrange(8)), kv_usage=rng.random())


@pytest.mark.parametrize("seed", range(20))
def test_kept_values_match_the_computed_ones_over_random_histories(seed: int) -> None:
    rng = random.Random(seed)
    store = Datastore(staleness=2.0)
    store.set_endpoints(ADDRESSES[:5])
    started: dict[str, int] = {}
    for _ in range(300):
        a = rng.choice(ADDRESSES)
        op = rng.randrange(8)
        if op == 0:
            store.set_endpoints(rng.sample(ADDRESSES, rng.randrange(1, len(ADDRESSES) + 1)))
        elif op == 1:
            started[a] = store.total_picks.get(a, 0)
        elif op == 2:
            store.record_scrape(a, _signals(rng), started.pop(a, store.total_picks.get(a, 0)))
        elif op in (3, 4):
            store.acquire(a, rng.choice((0, 100)))
        elif op == 5:
            store.release(a)
        elif op == 6:
            store.set_peer_load(None if rng.random() < 0.3 else PeerTotals(
                {b: rng.randrange(4) for b in ADDRESSES}, {}, {b: rng.randrange(3) for b in ADDRESSES}, replicas=1))
        else:
            store.record_scrape_error(a, "refused")
        snapshot = store.snapshot()
        endpoints = list(snapshot.endpoints)
        assert snapshot.queued_and_loads(endpoints) == _computed(snapshot, endpoints)
        some = rng.sample(endpoints, len(endpoints) // 2)
        assert snapshot.queued_and_loads(some) == _computed(snapshot, some)


def test_a_pick_since_the_scrape_counts_as_queued_until_the_next_scrape_shows_it() -> None:
    store = Datastore(staleness=2.0)
    store.set_endpoints(ADDRESSES[:2])
    a, b = ADDRESSES[:2]
    store.record_scrape(a, EngineSignals(waiting=1.0, running=2.0), 0)
    store.record_scrape(b, EngineSignals(waiting=0.0, running=0.0), 0)
    store.acquire(a)
    store.acquire(a)
    snapshot = store.snapshot()
    assert snapshot.queued_and_loads(list(snapshot.endpoints)) == ([3.0, 0.0], [3.0, 0.0])
    started = store.total_picks[a]
    store.record_scrape(a, EngineSignals(waiting=2.0, running=3.0), started)  # the two picks are in it
    snapshot = store.snapshot()
    assert snapshot.queued_and_loads(list(snapshot.endpoints)) == ([2.0, 0.0], [5.0, 0.0])
    store.release(a)
    store.release(a)
    snapshot = store.snapshot()
    assert snapshot.queued_and_loads(list(snapshot.endpoints)) == ([2.0, 0.0], [5.0, 0.0])


def test_an_endpoint_the_datastore_does_not_hold_is_computed_from_its_signals() -> None:
    store = Datastore(staleness=2.0)
    store.set_endpoints(ADDRESSES[:1])
    stranger = EndpointState("10.9.9.9:8000", EngineSignals(waiting=4.0, running=1.0))
    snapshot = store.snapshot()
    assert snapshot.queued_and_loads([*snapshot.endpoints, stranger]) == ([0.0, 4.0], [0.0, 5.0])
