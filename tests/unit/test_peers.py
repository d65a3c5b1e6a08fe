"""Active-active replicas' shared state: the loads they publish, the datastore's merged counters,
the prefix journal, flow control's pool caps and the flags."""

from __future__ import annotations

import argparse

import pytest

from epp.cli import build_parser, shared_state_options
from epp.datastore.endpoint import EngineSignals
from epp.datastore.peers import PeerFormatError, PeerLoads, PeerTotals, ReplicaLoad
from epp.datastore.store import Datastore
from epp.flowcontrol.controller import FlowController, Outcome
from epp.scheduling.params import Params
from epp.scheduling.prefix_producer import ApproxPrefixProducer
from epp.server.sharedstate import pack_records, unpack_records

from .test_flowcontrol import item, settings

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def load(replica: str, seq: int, **kw: object) -> ReplicaLoad:
    return ReplicaLoad(replica, seq, **kw)  # type: ignore[arg-type]


def test_a_load_survives_its_encoding() -> None:
    x = ReplicaLoad("r1", 7, {A: 2}, {A: 300}, {A: 1, B: 0}, 3, 4096)
    y = ReplicaLoad.decode(x.encode())
    assert (y.replica, y.seq, y.inflight, y.tokens, y.recent, y.queued, y.queued_bytes) == \
        ("r1", 7, {A: 2}, {A: 300}, {A: 1}, 3, 4096)


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"v": 2}', b'{"v": 1, "r": "x"}',
                                 b'{"v":1,"r":"x","s":1,"i":[],"t":{},"p":{},"q":0,"b":0}',
                                 b'{"v":1,"r":"x","s":1,"i":{"a":"many"},"t":{},"p":{},"q":0,"b":0}'])
def test_what_is_not_a_load_is_refused(raw: bytes) -> None:
    with pytest.raises(PeerFormatError):
        ReplicaLoad.decode(raw)


def test_peers_sum_and_leave_this_replica_out() -> None:
    peers = PeerLoads("me", staleness=1.0)
    peers.update([load("me", 1, inflight={A: 9}), load("r1", 1, inflight={A: 1, B: 2}, queued=2, queued_bytes=10),
                  load("r2", 1, inflight={A: 3}, tokens={A: 50}, recent={B: 1}, queued=1, queued_bytes=5)], now=0.0)
    t = peers.totals()
    assert (t.inflight, t.tokens, t.recent, t.queued, t.queued_bytes, t.replicas) == \
        ({A: 4, B: 2}, {A: 50}, {B: 1}, 3, 15, 2)


def test_a_peer_whose_load_stops_moving_is_dropped_and_one_not_listed_has_left() -> None:
    peers = PeerLoads("me", staleness=1.0)
    peers.update([load("r1", 1), load("r2", 1)], now=0.0)
    peers.update([load("r1", 2), load("r2", 1)], now=0.8)  # r2 did not publish again
    assert peers.replicas() == ["r1", "r2"]
    peers.update([load("r1", 3), load("r2", 1)], now=1.5)
    assert peers.replicas() == ["r1"]
    peers.update([load("r2", 1)], now=1.6)  # r1 removed its field (stopped cleanly); r2 comes back silent
    assert peers.replicas() == ["r2"]
    assert peers.expire(3.0) == ["r2"] and peers.totals().replicas == 0


def test_the_datastore_counts_its_own_picks_plus_the_peers() -> None:
    store = Datastore()
    store.set_endpoints([A, B])
    store.acquire(A, tokens=100)
    assert store.inflight is store.own_inflight  # alone: one set of counters
    store.set_peer_load(PeerTotals({A: 2, B: 1, C: 5}, {B: 40}, {A: 1}, replicas=1))
    assert store.inflight == {A: 3, B: 1} and store.inflight_tokens == {A: 100, B: 40}
    assert store.recent_picks == {A: 2, B: 0}  # (C is not in this replica's pool)
    store.acquire(B, tokens=10)
    store.prefilled(A, 100)
    store.release(A)
    assert store.own_inflight == {A: 0, B: 1} and store.inflight == {A: 2, B: 2}
    assert store.inflight_tokens == {B: 50}
    snap = store.snapshot()
    assert snap.inflight is store.inflight
    store.record_scrape(A, EngineSignals(), picks_at_start=1)  # picks since the scrape: own 0 + the peer's 1
    assert store.recent_picks[A] == 1
    store.set_endpoints([B])
    assert A not in store.inflight and A not in store.own_inflight
    store.set_peer_load(None)
    assert store.inflight is store.own_inflight and store.inflight == {B: 1}


def test_the_prefix_journal_holds_own_records_not_the_peers() -> None:
    p = ApproxPrefixProducer("prefix", Params({}, "prefix"))
    assert p.take_prefix_records() == (p.index.block_tokens, [])  # the first take starts the journal
    p.index.record(A, [1, 2, 3])
    p.add_peer_prefix_records(p.index.block_tokens, [(B, [1, 2])])
    p.add_peer_prefix_records(p.index.block_tokens * 2, [(C, [1])])  # another block size: not comparable
    assert p.index.match_lengths([1, 2, 3]) == {A: 3, B: 2}
    assert p.take_prefix_records() == (p.index.block_tokens, [(A, [1, 2, 3])])
    assert p.take_prefix_records()[1] == []


def test_packed_records_unpack_and_garbage_is_refused() -> None:
    entry = pack_records("prefix", 64, [(A, [1, 2**64 - 1]), (B, [])])
    assert unpack_records(entry) == ("prefix", 64, [(A, [1, 2**64 - 1]), (B, [])])
    for bad in (None, ["prefix", 64], ["prefix", 64, [[A, b"\x00" * 7]]]):
        with pytest.raises(ValueError):
            unpack_records(bad)


def test_the_pool_caps_count_the_other_rooms() -> None:
    fc = FlowController(settings(max_requests=3, max_bytes=100))
    fc.elsewhere = (2, 0)
    assert fc.enqueue(item(tag="first"), 0.0) == (None, [])
    assert fc.enqueue(item(tag="second"), 0.0)[0] is Outcome.REJECTED_CAPACITY
    fc.elsewhere = (0, 85)
    assert fc.enqueue(item(size=10), 0.0)[0] is Outcome.REJECTED_CAPACITY  # 10 + 85 + 10 bytes > 100
    fc.elsewhere = (0, 0)
    assert fc.enqueue(item(size=10), 0.0) == (None, [])


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "--endpoints", A, *argv])


def test_the_flags() -> None:
    assert shared_state_options(parse(), None) is None
    o = shared_state_options(parse("--shared-state-url", "redis://:pw@store:6379/0", "--pool-name", "p"), None)
    assert (o.url, o.key, o.interval, o.staleness) == ("redis://:pw@store:6379/0", "epp:default/p", 0.05, 1.0)
    with pytest.raises(ValueError, match="exclude each other"):
        shared_state_options(parse("--shared-state-url", "redis://x", "--ha-enable-leader-election"), None)
    with pytest.raises(ValueError, match=r"expected redis://.*got 'store:1'"):
        shared_state_options(parse("--shared-state-url", "http://:secret@store:1"), None)
    with pytest.raises(ValueError, match="twice"):
        shared_state_options(parse("--shared-state-url", "redis://x", "--shared-state-staleness", "50ms"), None)
