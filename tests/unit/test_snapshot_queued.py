"""Snapshot.queued: the waiting requests the queue scorer and the utilization detector read."""

from __future__ import annotations

from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.params import Params
from epp.scheduling.plugins import QueueScorer
from epp.scheduling.types import CycleState


def snapshot(waiting: float, running: float, inflight: int, recent: int) -> tuple[Snapshot, EndpointState]:
    e = EndpointState("a", EngineSignals(waiting=waiting, running=running), scraped_at=1.0)
    return Snapshot((e,), {"a": inflight}, {"a": recent}, 1.0, 2.0), e


def test_picks_since_the_scrape_count_while_in_flight() -> None:
    s, e = snapshot(waiting=2, running=3, inflight=5, recent=2)
    assert s.queued(e) == 4  # 2 waiting + 2 picked since the scrape
    s, e = snapshot(waiting=2, running=3, inflight=1, recent=2)
    assert s.queued(e) == 3  # only one of them is still in flight


def test_a_pick_the_scrape_came_too_early_to_show_still_counts() -> None:
    # picked just before the scrape, not at the engine when it was read: nothing recent, nothing seen
    s, e = snapshot(waiting=0, running=0, inflight=1, recent=0)
    assert s.queued(e) == 1
    s, e = snapshot(waiting=1, running=4, inflight=3, recent=0)  # others' requests run there too
    assert s.queued(e) == 1


def test_a_pod_without_signals_counts_its_recent_picks() -> None:
    e = EndpointState("a", None, scraped_at=0.0)
    assert Snapshot((e,), {"a": 2}, {"a": 3}, 1.0, 2.0).queued(e) == 2


def test_the_queue_scorer_prefers_the_idle_pod_to_one_whose_request_is_on_its_way() -> None:
    on_its_way = EndpointState("a", EngineSignals(), scraped_at=1.0)
    idle = EndpointState("b", EngineSignals(), scraped_at=1.0)
    s = Snapshot((on_its_way, idle), {"a": 1}, {}, 1.0, 2.0)
    request = InferenceRequest("id", "/v1/completions", model="m", prompt="x", headers={}, body={})
    scorer = QueueScorer("queue-scorer", Params({}, "p"))
    assert scorer.score(request, s, [on_its_way, idle], CycleState()) == [0.0, 1.0]
