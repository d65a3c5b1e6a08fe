"""Flow control as pure code: queues, ordering, fairness, bands, caps, TTLs, detectors, policies."""

from __future__ import annotations

from typing import Any

import pytest

from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Datastore, Snapshot
from epp.flowcontrol.contract import QueuedRequest
from epp.flowcontrol.controller import BandSpec, FlowController, FlowSettings, Outcome
from epp.flowcontrol.detectors import ConcurrencyDetector, UtilizationDetector
from epp.flowcontrol.policies import (
    EDFOrdering,
    FCFSOrdering,
    GlobalStrictFairness,
    LeastPrefillOrdering,
    PriorityHoldback,
    RoundRobinFairness,
    SLODeadlineOrdering,
    SoftReflectiveCeiling,
    StaticUsageLimit,
)
from epp.request import InferenceRequest
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError, CycleState

NOW = 100.0


def p(cls: type[Any], **params: Any) -> Any:
    return cls(cls.type_name, Params(params, cls.type_name))


class Gate:
    """A detector whose saturation the test sets."""

    type_name = "test-gate"
    name = "gate"

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def saturation(self, snapshot: Snapshot, endpoints: Any) -> float:
        return self.value if endpoints else 1.0

    def stale_count(self, snapshot: Snapshot, endpoints: Any) -> int:
        return 0

    def filter(self, request: Any, snapshot: Snapshot, candidates: Any, cycle: Any) -> Any:
        return candidates


def settings(gate: Gate | None = None, **kw: Any) -> FlowSettings:
    kw.setdefault("usage_limit", p(StaticUsageLimit))
    return FlowSettings(gate or Gate(), fairness=kw.pop("fairness", p(GlobalStrictFairness)),
                        ordering=kw.pop("ordering", p(FCFSOrdering)), **kw)


def pool(n: int = 2) -> Snapshot:
    return Snapshot(tuple(EndpointState(f"e{i}", EngineSignals(), scraped_at=NOW) for i in range(n)), {}, {}, NOW, 2.0)


def item(flow: str = "", priority: int = 0, size: int = 10, received: float = NOW, slo: float | None = None,
         tag: str = "") -> QueuedRequest:
    return QueuedRequest(flow, priority, size, received, tag or f"{flow}{priority}", slo)


def drain(fc: FlowController, snap: Snapshot | None = None) -> list[Any]:
    out = []
    while (it := fc.next(snap or pool())) is not None:
        out.append(it.payload)
    return out


# -- queues, ordering and fairness ----------------------------------------------------------------------
def test_fcfs_within_a_flow_and_counts_stay_exact() -> None:
    fc = FlowController(settings())
    for i in range(5):
        assert fc.enqueue(item(tag=f"r{i}", size=100), NOW + i) == (None, [])
    t = fc.queues.totals
    assert (t.count, t.nbytes) == (5, 500)
    victim = next(i for i in fc.queues.items() if i.payload == "r2")
    assert fc.cancel(victim) and not fc.cancel(victim)
    assert drain(fc) == ["r0", "r1", "r3", "r4"]
    assert (t.count, t.nbytes) == (0, 0) and not fc.queues.bands[0].flows


def test_edf_orders_by_deadline_and_slo_deadline_by_the_ttft_slo() -> None:
    fc = FlowController(settings(ordering=p(SLODeadlineOrdering)))
    fc.enqueue(item(tag="no-slo", received=NOW), NOW)
    fc.enqueue(item(tag="slo-2s", received=NOW, slo=2.0), NOW)
    fc.enqueue(item(tag="slo-500ms-late", received=NOW + 1, slo=0.5), NOW + 1)
    assert drain(fc) == ["slo-500ms-late", "slo-2s", "no-slo"]
    edf = FlowController(settings(ordering=p(EDFOrdering), default_ttl=10.0))
    edf.enqueue(item(tag="a"), NOW)
    edf.reconfigure(settings(ordering=p(EDFOrdering), default_ttl=1.0))
    edf.enqueue(item(tag="b"), NOW + 1)  # a shorter budget: an earlier deadline than a's
    assert drain(edf) == ["b", "a"]


def cost(tokens: int, tag: str) -> QueuedRequest:
    it = item(tag=tag)
    it.cost = tokens
    return it


def test_least_prefill_serves_the_cheapest_first_and_ages_the_costly_ones_up() -> None:
    fc = FlowController(settings(ordering=p(LeastPrefillOrdering)))
    fc.enqueue(cost(3000, "cold"), NOW)
    fc.enqueue(cost(200, "warm"), NOW + 0.1)
    fc.enqueue(cost(0, "cached"), NOW + 0.2)
    assert drain(fc) == ["cached", "warm", "cold"]
    # 1,000 tokens per second waited (the default): a 3,000-token prompt 3 s old goes before a
    # fresh 200-token one, and ties go by arrival.
    fc.enqueue(cost(3000, "old-cold"), NOW)
    fc.enqueue(cost(200, "fresh-warm"), NOW + 3.0)
    fc.enqueue(cost(200, "fresher-warm"), NOW + 3.0)
    assert drain(fc) == ["old-cold", "fresh-warm", "fresher-warm"]
    strict = FlowController(settings(ordering=p(LeastPrefillOrdering, agingTokensPerSecond=0)))
    strict.enqueue(cost(3000, "old-cold"), NOW)
    strict.enqueue(cost(200, "fresh-warm"), NOW + 3.0)
    assert drain(strict) == ["fresh-warm", "old-cold"]
    assert settings(ordering=p(LeastPrefillOrdering)).reads_prefill_estimate()
    assert not settings().reads_prefill_estimate()
    assert settings(bands={5: BandSpec(ordering=p(LeastPrefillOrdering))}).reads_prefill_estimate()
    with pytest.raises(ConfigError, match="agingTokensPerSecond"):
        p(LeastPrefillOrdering, agingTokensPerSecond=-1)
    with pytest.raises(ConfigError, match="agingTokens"):
        p(LeastPrefillOrdering, agingTokens=5)


def test_round_robin_alternates_flows_and_global_strict_keeps_arrival_order() -> None:
    def run(fairness: Any) -> list[Any]:
        fc = FlowController(settings(fairness=fairness))
        for i in range(4):
            fc.enqueue(item("big", tag=f"big{i}"), NOW + i)
        fc.enqueue(item("small", tag="small0"), NOW + 10)
        fc.enqueue(item("small", tag="small1"), NOW + 11)
        return drain(fc)

    assert run(p(RoundRobinFairness)) == ["big0", "small0", "big1", "small1", "big2", "big3"]
    assert run(p(GlobalStrictFairness)) == ["big0", "big1", "big2", "big3", "small0", "small1"]


def test_round_robin_turns_go_in_flow_order_after_the_flow_served_last() -> None:
    """The reference's cursor: a flow that gets work while another is being served comes next,
    not after that flow's next request (as an "oldest activation first" order would have it)."""
    fc = FlowController(settings(fairness=p(RoundRobinFairness)))
    for i in range(3):
        fc.enqueue(item("m", tag=f"m{i}"), NOW + i)
    assert fc.next(pool()).payload == "m0"
    fc.enqueue(item("z", tag="z0"), NOW + 5)  # after the cursor (m) in id order
    fc.enqueue(item("a", tag="a0"), NOW + 6)  # before it: its turn comes round after z's
    assert drain(fc) == ["z0", "a0", "m1", "m2"]
    fc.enqueue(item("b", tag="b0"), NOW + 7)
    fc.enqueue(item("n", tag="n0"), NOW + 8)
    # m, served last, has nothing queued: turns go on from its place (as the reference's, whose
    # flow keys keep an emptied flow until it is collected)
    assert drain(fc) == ["n0", "b0"]


def test_bands_dispatch_in_strict_priority_order() -> None:
    fc = FlowController(settings())
    fc.enqueue(item(priority=-1, tag="sheddable"), NOW)
    fc.enqueue(item(priority=0, tag="standard"), NOW + 1)
    fc.enqueue(item(priority=10, tag="critical"), NOW + 2)
    assert fc.queues.priorities == [10, 0, -1]
    assert drain(fc) == ["critical", "standard", "sheddable"]


def test_saturation_holds_dispatch_and_a_gated_band_blocks_the_ones_below() -> None:
    gate = Gate(1.0)
    holdback = p(PriorityHoldback, minCeiling=0.5)
    fc = FlowController(settings(gate, usage_limit=holdback))
    fc.enqueue(item(priority=10, tag="critical"), NOW)
    fc.enqueue(item(priority=0, tag="standard"), NOW)
    assert drain(fc) == []  # saturated: everything waits
    gate.value = 0.7  # under the top band's ceiling (1.0), over the bottom one's (0.5)
    assert drain(fc) == ["critical"]
    fc.enqueue(item(priority=10, tag="critical2"), NOW)
    assert drain(fc) == ["critical2"]
    gate.value = 0.4
    assert drain(fc) == ["standard"]
    assert fc.next(pool(0)) is None  # an empty pool reads saturated


# -- caps, displacement and TTLs -------------------------------------------------------------------------
def test_band_and_pool_caps_reject_at_once_and_displace_sheddable_requests() -> None:
    fc = FlowController(settings(max_requests=3, bands={5: BandSpec(max_requests=1)}))
    assert fc.enqueue(item(priority=5), NOW)[0] is None
    assert fc.enqueue(item(priority=5), NOW)[0] is Outcome.REJECTED_CAPACITY  # band 5 holds one
    assert fc.enqueue(item(priority=-1, tag="old-sheddable"), NOW)[0] is None
    assert fc.enqueue(item(priority=-1, tag="new-sheddable"), NOW + 1)[0] is None
    outcome, evicted = fc.enqueue(item(priority=0, tag="standard"), NOW + 2)  # pool full: the newest sheddable goes
    assert outcome is None and [e.payload for e in evicted] == ["new-sheddable"]
    assert fc.enqueue(item(priority=-1), NOW + 3) == (Outcome.REJECTED_CAPACITY, [])  # nothing lower to displace
    assert [e.payload for e in fc.enqueue(item(priority=0), NOW + 4)[1]] == ["old-sheddable"]
    fc.observe_pool(True, NOW + 5)
    assert fc.enqueue(item(priority=0), NOW + 5)[0] is Outcome.REJECTED_NO_ENDPOINTS
    bytes_cap = FlowController(settings(max_bytes=1000))
    assert bytes_cap.enqueue(item(size=4 * 1024 * 1024), NOW)[0] is Outcome.REJECTED_CAPACITY  # 4 MiB counts 4 MiB


def test_ttl_expires_oldest_first_and_the_no_endpoint_budget_starts_fresh() -> None:
    fc = FlowController(settings(default_ttl=1.0, no_endpoint_ttl=5.0))
    fc.enqueue(item(tag="a"), NOW)
    fc.enqueue(item(tag="b"), NOW + 0.5)
    assert fc.next_expiry() == NOW + 1.0
    expired, outcome = fc.expire(NOW + 1.2)
    assert [i.payload for i in expired] == ["a"] and outcome is Outcome.EVICTED_TTL
    fc.observe_pool(True, NOW + 1.4)  # scale to zero: b gets the no-endpoint budget, from now
    assert fc.expire(NOW + 3.0)[0] == [] and fc.next_expiry() == NOW + 6.4
    expired, outcome = fc.expire(NOW + 6.5)
    assert [i.payload for i in expired] == ["b"] and outcome is Outcome.EVICTED_NO_ENDPOINTS
    forever = FlowController(settings(default_ttl=0.0))
    forever.enqueue(item(), NOW)
    assert forever.next_expiry() is None and forever.expire(NOW + 1e6)[0] == []


def test_a_hundred_thousand_queued_requests_keep_exact_counts() -> None:
    fc = FlowController(settings(fairness=p(RoundRobinFairness)))
    fc.reconfigure(settings(fairness=p(RoundRobinFairness), default_band=BandSpec(max_requests=200_000)))
    for i in range(100_000):
        fc.enqueue(item(f"t{i % 7}", size=1), NOW + i * 1e-6)
    first = [fc.next(pool()) for _ in range(7)]
    assert sorted(i.flow_id for i in first if i) == [f"t{k}" for k in range(7)]
    assert fc.queues.totals.count == 100_000 - 7


# -- detectors ------------------------------------------------------------------------------------------------
def ep(addr: str, waiting: float = 0.0, kv: float = 0.0, age: float = 0.0, role: str | None = None) -> EndpointState:
    labels = {"llm-d.ai/role": role} if role else {}
    return EndpointState(addr, EngineSignals(waiting=waiting, kv_usage=kv), scraped_at=NOW - age, labels=labels)


def test_utilization_detector_is_the_references_roofline_plus_epps_own_recent_picks() -> None:
    d = p(UtilizationDetector)  # defaults: queue 5, kv 0.8, staleness 200ms
    eps = (ep("a", waiting=5), ep("b", kv=0.4), ep("c", age=1.0))
    snap = Snapshot(eps, {}, {}, NOW, 2.0)
    assert d.saturation(snap, eps) == pytest.approx((1.0 + 0.5 + 1.0) / 3)  # c is stale: fail-closed
    assert d.stale_count(snap, eps) == 1
    # Picks since b's scrape that are still in flight count as waiting there, and so do in-flight
    # picks its scrape did not show running or waiting (Snapshot.queued).
    busy = Snapshot(eps, {"b": 4}, {"b": 3}, NOW, 2.0)
    assert d.endpoint_score(eps[1], busy) == pytest.approx(4 / 5)
    shown = (eps[0], EndpointState("b", EngineSignals(running=4, kv_usage=0.4), scraped_at=NOW), eps[2])
    assert d.endpoint_score(shown[1], Snapshot(shown, {"b": 4}, {"b": 3}, NOW, 2.0)) == pytest.approx(3 / 5)
    kept = d.filter(InferenceRequest("r", "/v1/completions"), snap, list(eps), CycleState())
    assert [e.address for e in kept] == ["b"]
    with pytest.raises(ConfigError, match="kvCacheUtilThreshold"):
        p(UtilizationDetector, kvCacheUtilThreshold=0)
    with pytest.raises(ConfigError, match="queueDepthThreshold"):
        p(UtilizationDetector, queueDepthThreshold=0)


def test_concurrency_detector_modes_and_filter() -> None:
    eps = (ep("a"), ep("b"))
    snap = Snapshot(eps, {"a": 3, "b": 1}, {}, NOW, 2.0, {"a": 100, "b": 700})
    assert p(ConcurrencyDetector, maxConcurrency=4).saturation(snap, eps) == 0.5
    assert p(ConcurrencyDetector, maxTokenConcurrency=1000, concurrencyMode="tokens").saturation(snap, eps) == 0.4
    hybrid = p(ConcurrencyDetector, maxConcurrency=4, maxTokenConcurrency=1000, concurrencyMode="hybrid")
    assert hybrid.saturation(snap, eps) == pytest.approx((0.75 + 0.7) / 2)
    kept = p(ConcurrencyDetector, maxConcurrency=2, headroom=0.5).filter(
        InferenceRequest("r", "/v1/completions"), snap, list(eps), CycleState())
    assert [e.address for e in kept] == ["b"]  # a has 3 in flight, the limit is 2 * 1.5
    with pytest.raises(ConfigError, match="concurrencyMode"):
        p(ConcurrencyDetector, concurrencyMode="bogus")


def test_prefill_lookahead_stops_counting_a_backlog_shortly_before_it_is_computed() -> None:
    eps = (ep("a"), ep("b"))
    ahead = p(ConcurrencyDetector, maxTokenConcurrency=1000, concurrencyMode="hybrid", maxConcurrency=10,
              prefillLookahead="50ms", prefillTokensPerSecond=10_000)

    def kept(now: float) -> list[str]:
        # a: 1,000 tokens since NOW (computed by NOW + 0.1 s); b: 2,000 since NOW (by NOW + 0.2 s)
        snap = Snapshot(eps, {"a": 1, "b": 1}, {}, now, 2.0, {"a": 1000, "b": 2000}, {"a": NOW, "b": NOW})
        return [e.address for e in ahead.filter(InferenceRequest("r", "/v1/completions"), snap, list(eps),
                                                 CycleState())]

    assert kept(NOW + 0.04) == []  # both full: 1,000 and 2,000 tokens against a limit of 1,000
    assert kept(NOW + 0.05) == ["a"]  # a's backlog ends in 50 ms: its tokens no longer count
    assert kept(NOW + 0.15) == ["a", "b"]
    snap = Snapshot(eps, {"a": 1, "b": 1}, {}, NOW + 0.05, 2.0, {"a": 1000, "b": 2000}, {"a": NOW, "b": NOW})
    assert ahead.saturation(snap, eps) == pytest.approx((0.1 + 2.0) / 2)
    off = p(ConcurrencyDetector, maxTokenConcurrency=1000, concurrencyMode="tokens")
    assert off.saturation(snap, eps) == 1.5  # (without it, every pending token counts until the first bytes)
    with pytest.raises(ConfigError, match="prefillTokensPerSecond: required"):
        p(ConcurrencyDetector, concurrencyMode="hybrid", prefillLookahead="50ms")
    with pytest.raises(ConfigError, match="prefillTokensPerSecond: only read with prefillLookahead"):
        p(ConcurrencyDetector, concurrencyMode="hybrid", prefillTokensPerSecond=10_000)
    with pytest.raises(ConfigError, match="prefillLookahead: counts prompt tokens"):
        p(ConcurrencyDetector, prefillLookahead="50ms", prefillTokensPerSecond=10_000)


def test_cap_per_endpoint_counts_a_pod_over_its_limit_as_full_not_more() -> None:
    eps = tuple(ep(a) for a in "abcd")
    # three pods each computing one prompt larger than the limit, the fourth empty
    snap = Snapshot(eps, {"a": 1, "b": 1, "c": 1}, {}, NOW, 2.0, {"a": 3000, "b": 3000, "c": 3000})
    limits = {"maxConcurrency": 64, "maxTokenConcurrency": 2000}
    for mode in ("hybrid", "tokens"):
        reference = p(ConcurrencyDetector, concurrencyMode=mode, **limits)
        capped = p(ConcurrencyDetector, concurrencyMode=mode, capPerEndpoint=True, **limits)
        assert reference.saturation(snap, eps) == 1.125  # the pool reads full while d is empty
        assert capped.saturation(snap, eps) == 0.75
    requests = p(ConcurrencyDetector, maxConcurrency=2, capPerEndpoint=True)
    snap = Snapshot(eps, {"a": 5, "b": 1}, {}, NOW, 2.0)
    assert requests.saturation(snap, eps) == pytest.approx((1 + 0.5) / 4)


def _must_fit() -> tuple[Any, Any]:
    """A hybrid detector with tokensMustFit, bound to a prefix producer that has seen one prompt on a."""
    from epp.scheduling.prefix_producer import REFERENCE_DEFAULTS, ApproxPrefixProducer

    producer = ApproxPrefixProducer.with_limits("prefix", REFERENCE_DEFAULTS)
    detector = p(ConcurrencyDetector, concurrencyMode="hybrid", maxConcurrency=64, maxTokenConcurrency=2000,
                 tokensMustFit=True)
    detector.bind_producer(producer)
    seen = InferenceRequest("seen", "/v1/completions", model="m", prompt="x" * 12_000)  # ~3,000 tokens
    cycle = CycleState()
    producer.match(seen, [ep("a")], cycle)
    producer.record("a", cycle)
    return detector, producer


def test_tokens_must_fit_sends_a_prompt_only_where_it_fits_beside_what_is_pending() -> None:
    detector, _ = _must_fit()
    eps = [ep("a"), ep("b"), ep("c")]
    # a: 600 pending tokens; b: 600; c: 1,900
    snap = Snapshot(tuple(eps), {"a": 1, "b": 1, "c": 1}, {}, NOW, 2.0, {"a": 600, "b": 600, "c": 1900})

    def kept(prompt: str) -> list[str]:
        request = InferenceRequest("r", "/v1/completions", model="m", prompt=prompt)
        return [e.address for e in detector.filter(request, snap, eps, CycleState())]

    assert kept("x" * 12_000 + " and one question") == ["a"]  # cached on a: a few tokens to compute
    assert kept("q" * 800) == ["a", "b"]  # 200 tokens fit beside 600, not beside 1,900
    # ~3,000 uncached tokens fit nowhere: the pods with the least pending, among those under the limit
    assert kept("y" * 12_000) == ["a", "b"]
    empty = Snapshot(tuple(eps), {"a": 1, "b": 1}, {}, NOW, 2.0, {"a": 600, "b": 600})
    request = InferenceRequest("r", "/v1/completions", model="m", prompt="y" * 12_000)
    assert [e.address for e in detector.filter(request, empty, eps, CycleState())] == ["c"]  # nothing pending
    with pytest.raises(ConfigError, match="tokensMustFit: counts prompt tokens"):
        p(ConcurrencyDetector, tokensMustFit=True)
    with pytest.raises(ConfigError, match="prefixMatchInfoProducerName: only read with tokensMustFit"):
        p(ConcurrencyDetector, concurrencyMode="hybrid", prefixMatchInfoProducerName="prefix")


def test_tokens_must_fit_does_not_send_a_prompt_cold_where_waiting_for_its_cached_pod_costs_less() -> None:
    """Cached on a busy pod, a prompt waits for it rather than be computed whole on an empty one,
    unless that pod's backlog (half of what it has pending) is more than the detour would compute."""
    detector, _ = _must_fit()  # the producer has seen a ~3,000-token prompt on a
    eps = [ep("a"), ep("b")]

    def kept(pending_a: int, prompt: str = "x" * 12_000 + " and one question") -> list[str]:
        snap = Snapshot(tuple(eps), {"a": 1}, {}, NOW, 2.0, {"a": pending_a})
        request = InferenceRequest("r", "/v1/completions", model="m", prompt=prompt)
        return [e.address for e in detector.filter(request, snap, eps, CycleState())]

    # a has 1,500 tokens pending: ~4 of the prompt's fit beside them; b is empty, but there the
    # prompt computes ~3,000, more than a's backlog (~750 left) would cost it
    assert kept(1500) == ["a"]
    assert kept(7000) == ["b"]  # a over its limit, with ~3,500 left: computing it on b costs less
    assert kept(1500, "q" * 12_000) == ["b"]  # cached nowhere: where it fits
    # Fitting nowhere the filter falls back to the least pending (b); with flow control on the
    # waiting room holds such a request (below), so the filter does not see it then.
    assert kept(2500) == ["b"]
    held = item("t", tag="cached on a")
    held.prompt_tokens, held.matched = 3000, {"a": 2900}
    busy = Snapshot(tuple(eps), {"a": 1}, {}, NOW, 2.0, {"a": 2500})
    assert not detector.fits(held, busy, eps)  # the waiting room holds it for a
    assert detector.fits(held, Snapshot(tuple(eps), {"a": 1}, {}, NOW, 2.0, {"a": 7000}), eps)
    assert detector.fits(held, Snapshot(tuple(eps), {"a": 1}, {}, NOW, 2.0, {"a": 1500}), eps)  # fits on a


def test_tokens_must_fit_holds_a_head_that_fits_nowhere_until_a_pod_can_take_it() -> None:
    detector, _ = _must_fit()
    fc = FlowController(settings(detector, fairness=p(RoundRobinFairness)))
    assert fc.settings.reads_prefill_estimate()  # the room estimates each request's prefill for it
    eps = (ep("a"), ep("b"))
    busy = Snapshot(eps, {"a": 1, "b": 1}, {}, NOW, 2.0, {"a": 600, "b": 1500})
    long, other_long = item("tenant-a", tag="long"), item("tenant-b", tag="other long")
    long.cost = other_long.cost = 3000
    fc.enqueue(long, NOW)
    fc.enqueue(other_long, NOW + 0.01)
    assert drain(fc, busy) == []  # the head (long) fits nowhere, nor does anything else: the band waits
    assert fc.blocked == 0
    behind, short = item("tenant-a", tag="behind it"), item("tenant-b", tag="short")
    behind.cost, short.cost = 100, 200
    fc.enqueue(behind, NOW + 0.02)
    fc.enqueue(short, NOW + 0.03)
    # What fits beside what is pending goes while the head waits: from its own flow first, then
    # from the next flow in turn; the head keeps its turn.
    assert drain(fc, busy) == ["behind it", "short"]
    assert fc.blocked == 0
    freed = Snapshot(eps, {"a": 1, "b": 1}, {}, NOW, 2.0, {"b": 1500})
    # a's backlog is computed: the long prompt that kept its turn goes first, then turns go on
    # (the snapshot does not count what dispatches, so everything fits)
    assert drain(fc, freed) == ["long", "other long"]
    off = FlowController(settings(p(ConcurrencyDetector, concurrencyMode="hybrid", maxTokenConcurrency=2000)))
    assert not off.settings.reads_prefill_estimate()


def test_backfill_looks_only_near_the_front_of_each_flow() -> None:
    detector, _ = _must_fit()
    busy = Snapshot((ep("a"),), {"a": 1}, {}, NOW, 2.0, {"a": 1500})

    def behind_longs(longs: int) -> FlowController:
        """One flow (fcfs by enqueue time): ``longs`` prompts that fit nowhere, then a short one."""
        fc = FlowController(settings(detector, fairness=p(RoundRobinFairness)))
        for i in range(longs):
            x = item("t", tag=f"long{i}")
            x.cost = 3000
            fc.enqueue(x, NOW + i)
        short = item("t", tag=f"short after {longs}")
        short.cost = 100
        fc.enqueue(short, NOW + longs + 1)
        return fc

    far = behind_longs(40)
    assert drain(far, busy) == []  # it would fit, but is far behind: the band waits
    assert far.queues.bands[0].flows["t"].first_few(15)[0].payload == "long0"
    assert drain(behind_longs(9), busy) == ["short after 9"]


def test_tokens_must_fit_judges_a_held_request_by_what_it_would_compute_on_each_pod() -> None:
    """Cached on a full pod, a long prompt is cold on the others: it waits rather than be sent to
    one with short prompts pending (found live: the estimate where it was cached let it go, and
    the filter then packed it beside them)."""
    detector, _ = _must_fit()
    fc = FlowController(settings(detector))
    eps = (ep("a"), ep("b"))
    snap = Snapshot(eps, {"a": 1, "b": 1}, {}, NOW, 2.0, {"a": 2500, "b": 100})
    held = item("t", tag="cached on a")
    held.prompt_tokens, held.matched = 3800, {"a": 3700}
    held.cost = 100
    fc.enqueue(held, NOW)
    assert drain(fc, snap) == []  # 100 tokens would fit on b, but there it computes 3,800
    assert drain(fc, Snapshot(eps, {"a": 1, "b": 1}, {}, NOW, 2.0, {"a": 1800, "b": 100})) == ["cached on a"]


def test_the_datastore_dates_each_endpoints_prompt_backlog() -> None:
    clock = [10.0]
    store = Datastore(clock=lambda: clock[0])
    store.set_endpoints(["a"])
    store.acquire("a", 300)
    clock[0] = 10.5
    store.acquire("a", 200)  # joins the backlog: its start stays
    assert store.snapshot().tokens_since == {"a": 10.0}
    clock[0] = 11.0
    store.prefilled("a", 300)  # the first prompt is computed; the rest goes on from now
    assert store.snapshot().tokens_since == {"a": 11.0}
    store.prefilled("a", 200)
    assert store.snapshot().tokens_since == {} and store.snapshot().inflight_tokens == {}


def test_saturation_is_the_worse_of_the_prefill_and_decode_stages() -> None:
    fc = FlowController(settings(p(UtilizationDetector)))
    eps = (ep("p", waiting=10, role="prefill"), ep("d1", role="decode"), ep("d2"))
    assert fc.saturation(Snapshot(eps, {}, {}, NOW, 2.0)) == 2.0
    assert fc.last_saturation == {"prefill": 2.0, "decode": 0.0, "effective": 2.0}


# -- usage limits ----------------------------------------------------------------------------------------------
def test_usage_limit_policies_compute_the_references_ceilings() -> None:
    ceilings = [0.0] * 3
    p(StaticUsageLimit, threshold=0.8).compute(0.5, [10, 0, -5], ceilings)
    assert ceilings == [0.8, 0.8, 0.8]
    p(PriorityHoldback, minCeiling=0.4).compute(0.5, [10, 0, -5], ceilings)
    assert ceilings == pytest.approx([1.0, 0.7, 0.4])
    p(PriorityHoldback, minCeiling=0.4, domain="value").compute(0.5, [10, 0, -5], ceilings)
    assert ceilings == pytest.approx([1.0, 0.4 + 5 / 15 * 0.6, 0.4])
    one = [0.0]
    p(PriorityHoldback, minCeiling=0.4).compute(0.9, [3], one)
    assert one == [1.0]
    with pytest.raises(ConfigError, match="minCeiling: required"):
        p(PriorityHoldback)
    with pytest.raises(ConfigError, match="less than maxCeiling"):
        p(PriorityHoldback, minCeiling=0.5, maxCeiling=0.5)


def test_soft_reflective_ceiling_opens_gated_bands_on_a_duty_cycle() -> None:
    policy = p(SoftReflectiveCeiling)
    opens = 0
    for _ in range(300):
        ceilings = [0.0, 0.0]
        policy.compute(0.75, [1, 0], ceilings)  # period round(0.75 / 0.25) = 3
        assert ceilings[0] == 1.0
        opens += ceilings[1] == 1.0
    assert opens == 100
    ceilings = [0.0, 0.0]
    policy.compute(0.3, [1, 0], ceilings)
    assert ceilings == [1.0, 1.0]  # under the reflective ceiling: open
    policy.compute(1.2, [1, 0], ceilings)
    assert ceilings == [1.0, 0.0]


# -- program-aware fairness ----------------------------------------------------------------------------------
def test_program_aware_fairness_serves_the_least_served_program_and_forgets_service() -> None:
    from epp.flowcontrol.programs import ProgramAwareFairness

    clock = [NOW]
    policy = ProgramAwareFairness("pa", Params({"lasHalfLifeSeconds": 10, "evictionTtlSeconds": 100,
                                                "evictionSweepSeconds": 50}, "pa"), clock=lambda: clock[0])
    fc = FlowController(settings(fairness=policy))
    for flow in ("heavy", "light"):
        for i in range(3):
            fc.enqueue(item(flow, tag=f"{flow}{i}"), NOW)
    policy.on_dispatched("heavy", 0.0)
    policy.on_completed("heavy", 1000, 500)  # 2,000 weighted tokens attained
    policy.on_completed("gone", 10, 10)  # a program that sends nothing more
    assert fc.next(pool()).payload == "light0"  # the program with less service goes first
    clock[0] += 100.0  # ten half-lives: heavy's service is nearly forgotten; heads' waits now tie
    assert policy.programs["heavy"].service == 2000.0
    fc.next(pool())
    assert policy._service(policy.programs["heavy"], clock[0]) < 2.0
    families = {f.name: f for f in policy.metric_families("default")}
    assert "llm_d_epp_program_aware_jains_fairness_index" in families
    clock[0] += 200.0
    policy.pick(fc.queues.bands[0], None)  # a sweep: idle programs past evictionTtlSeconds go
    assert "gone" not in policy.programs and "heavy" in policy.programs  # (heavy still has work queued)
    with pytest.raises(ConfigError, match="strategy"):
        ProgramAwareFairness("pa", Params({"strategy": "wfq"}, "pa"))
