"""In-flight eviction as pure code: the victims' order, the demand that triggers it, sizing and
stop-and-wait pacing (epp.flowcontrol.eviction)."""

from __future__ import annotations

import pytest

from epp.flowcontrol.eviction import (
    CONFIRMATION_TIMEOUT,
    ENGINE_RECLAIM_BUDGET,
    LEADING_SENSOR_GRACE,
    EvictionPolicies,
    InFlight,
    Reclamation,
    confirmation_grace,
    demand,
)
from epp.flowcontrol.policies import (
    PriorityThenProgressEvictionOrder,
    PriorityThenTimeEvictionOrder,
    SheddableEvictionFilter,
)
from epp.scheduling.params import Params

POLICIES = EvictionPolicies(SheddableEvictionFilter("f", Params({}, "f")),
                            PriorityThenTimeEvictionOrder("o", Params({}, "o")))


def test_victims_are_sheddable_lowest_priority_first_then_newest_dispatch() -> None:
    t: InFlight[str] = InFlight(POLICIES)
    for key, priority, at in [("crit", 10, 1.0), ("std", 0, 2.0), ("old-1", -1, 3.0), ("new-1", -1, 4.0),
                              ("old-5", -5, 5.0), ("new-5", -5, 6.0)]:
        t.track(key, priority, at)
    assert (len(t), t.evictable) == (6, 4)
    assert t.victim_priority() == -5
    order = []
    while (v := t.pop_victim(below=0)) is not None:
        order.append(v)
    assert order == ["new-5", "old-5", "new-1", "old-1"]
    assert (len(t), t.evictable) == (2, 0) and t.victim_priority() is None


def test_a_victim_at_or_above_the_bound_stays_and_ended_requests_are_never_victims() -> None:
    t: InFlight[str] = InFlight(POLICIES)
    t.track("a", -1, 1.0)
    t.track("b", -2, 2.0)
    t.untrack("b")  # ended
    assert t.pop_victim(below=-1) is None  # -1 is not strictly below -1
    assert t.evictable == 1 and "a" in t
    t.track("c", -1, 3.0, evictable=False)  # counted in flight, its front end cannot end it
    assert (len(t), t.evictable) == (2, 1)
    assert t.pop_victim(below=0) == "a" and t.pop_victim(below=0) is None


def test_tracking_a_key_again_replaces_it() -> None:
    t: InFlight[str] = InFlight(POLICIES)
    t.track("a", -1, 1.0)
    t.track("a", 0, 2.0)
    assert (len(t), t.evictable, t.victim_priority()) == (1, 0, None)


PROGRESS = EvictionPolicies(SheddableEvictionFilter("f", Params({}, "f")),
                            PriorityThenProgressEvictionOrder("o", Params({}, "o")))


def test_progress_order_takes_requests_whose_response_has_not_started_first() -> None:
    t: InFlight[str] = InFlight(PROGRESS)
    for key, priority, at in [("a", -1, 1.0), ("b", -1, 2.0), ("c", -1, 3.0), ("d", -2, 4.0), ("crit", 10, 5.0)]:
        t.track(key, priority, at)
    t.started("c")  # the newest of priority -1 is streaming: it goes after the others of its priority
    t.started("d")  # a lower priority still goes first, started or not
    t.started("crit")  # (not evictable: nothing moves)
    t.started("gone")  # (not tracked: ignored)
    assert (len(t), t.evictable) == (5, 4)
    order = []
    while (v := t.pop_victim(below=0)) is not None:
        order.append(v)
    assert order == ["d", "b", "a", "c"]
    assert (len(t), t.evictable) == (1, 0)


def test_a_started_request_that_ends_is_no_victim_and_a_second_start_changes_nothing() -> None:
    t: InFlight[str] = InFlight(PROGRESS)
    t.track("a", -1, 1.0)
    t.track("b", -1, 2.0)
    t.started("b")
    t.started("b")
    t.untrack("b")
    assert t.evictable == 1 and t.pop_victim(below=0) == "a" and t.pop_victim(below=0) is None


def test_the_references_order_ignores_progress() -> None:
    t: InFlight[str] = InFlight(POLICIES)
    t.track("a", -1, 1.0)
    t.track("b", -1, 2.0)
    t.started("b")
    assert [t.pop_victim(below=0), t.pop_victim(below=0)] == ["b", "a"]
    assert len(t._heap) == 0  # (no entry was moved)


HAS = {10: True, 5: False, 0: True}.__getitem__


@pytest.mark.parametrize(("ceilings", "saturation", "blocked", "victim", "found"), [
    ([1.0, 1.0, 1.0], 1.0, 0, -1, 0),     # the blocked band has queued work
    ([1.0, 1.0, 1.0], 1.0, 1, -1, 2),     # band 5 has none: the next one that has
    ([1.0, 1.0, 1.0], 1.0, 0, 5, 0),      # victim 5: only band 10 is above it
    ([1.0, 1.0, 1.0], 1.0, 1, 5, None),   # band 5 is not above a victim of 5
    ([0.0, 1.0, 1.0], 1.0, 0, -1, 2),     # a zero ceiling never dispatches: not demand
    ([1.0, 1.0, 0.8], 0.9, 0, -1, 2),     # bands 10 and 5 are below their ceilings: they go alone
    ([1.0, 1.0, 1.0], 1.0, 0, 10, None),  # nothing above the victim
])
def test_demand_is_the_first_blocked_band_above_the_victim_with_queued_work(
        ceilings: list[float], saturation: float, blocked: int, victim: int, found: int | None) -> None:
    assert demand([10, 5, 0], ceilings, saturation, blocked, victim, HAS) == found


@pytest.mark.parametrize(("saturation", "ceiling", "in_flight", "evictable", "n"), [
    (1.0, 1.0, 8, 8, 1),    # at the ceiling: one, to get strictly below it
    (1.25, 1.0, 8, 8, 2),   # deficit 0.25 / credit 0.156 -> 2
    (2.0, 1.0, 8, 8, 2),    # 4 needed: at most 2 per decision
    (2.0, 1.0, 8, 1, 1),    # only one evictable
    (0.5, 1.0, 8, 8, 0),    # below the ceiling: nothing
    (1.0, 1.0, 0, 0, 0),    # nothing in flight
])
def test_sizing_is_the_deficit_over_the_mean_footprint_capped(saturation: float, ceiling: float, in_flight: int,
                                                               evictable: int, n: int) -> None:
    assert Reclamation[str](grace=0.01).size(saturation, ceiling, in_flight, evictable)[0] == n


def test_pacing_waits_for_the_confirmation_then_the_grace() -> None:
    rc = Reclamation[str](grace=0.5)
    assert rc.gate_open(0.0)
    n, credit = rc.size(1.0, 1.0, 4, 4)
    assert (n, credit) == (1, 0.25)
    rc.issued("v", credit, now=0.0)
    assert not rc.gate_open(1.0) and rc.pending == 0.25  # unconfirmed
    assert rc.confirm("v", now=2.0) == 2.0
    assert rc.confirm("v", now=2.0) is None  # once
    assert not rc.gate_open(2.4)  # cooling: the gauge has not shown the freed capacity yet
    assert rc.gate_open(2.5) and rc.pending == 0.0


def test_an_unconfirmed_revocation_times_out_and_is_reported() -> None:
    rc = Reclamation[str](grace=0.0)
    rc.issued("hung", 0.5, now=0.0)
    assert not rc.gate_open(CONFIRMATION_TIMEOUT - 0.1) and rc.timed_out == []
    assert rc.gate_open(CONFIRMATION_TIMEOUT) and rc.timed_out == ["hung"]
    assert rc.confirm("hung", now=CONFIRMATION_TIMEOUT + 1) is None  # already retired


def test_the_grace_follows_the_detector() -> None:
    assert confirmation_grace("concurrency-detector", 0.05, 2.0) == LEADING_SENSOR_GRACE
    assert confirmation_grace("utilization-detector", 0.05, 2.0) == pytest.approx(2.05 + ENGINE_RECLAIM_BUDGET)
