"""The scheduler as a pure function of (snapshot, request)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from epp.config import DEFAULT_CONFIG, parse_config
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Datastore, Snapshot
from epp.flowcontrol.detectors import UtilizationDetector
from epp.request import InferenceRequest
from epp.requestcontrol.admission import SheddableAdmission
from epp.scheduling.framework import Scheduler
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError, SchedulingError

NOW = 1000.0


def ep(addr: str, waiting: float = 0, kv: float = 0.0, age: float = 0.0, error: str | None = None,
       running: float = 0) -> EndpointState:
    return EndpointState(addr, EngineSignals(waiting=waiting, running=running, kv_usage=kv), scraped_at=NOW - age,
                         error=error)


def snap(*eps: EndpointState, inflight: dict[str, int] | None = None,
         recent: dict[str, int] | None = None) -> Snapshot:
    return Snapshot(tuple(eps), inflight or {}, recent or {}, NOW, 2.0)


def scheduler(text: str = DEFAULT_CONFIG, seed: int = 1) -> Scheduler:
    s, _ = parse_config(text).build()
    s.profile.picker.rng = random.Random(seed)  # type: ignore[attr-defined]
    return s


def req(prompt: str = "hello", model: str = "m") -> InferenceRequest:
    return InferenceRequest("id", "/v1/completions", model=model, prompt=prompt)


def test_avoids_long_queue_and_prefers_free_kv() -> None:
    s = scheduler()
    assert s.schedule(req(), snap(ep("a", waiting=20), ep("b", waiting=0), ep("c", waiting=20))).primary == "b"
    assert s.schedule(req(), snap(ep("a", kv=0.9), ep("b", kv=0.9), ep("c", kv=0.1))).primary == "c"


def test_prefix_affinity_after_a_pick_is_recorded() -> None:
    s = scheduler()
    shared = "system prompt shared by a whole group of requests " * 20
    first = s.schedule(req(shared + "question 1"), snap(ep("a"), ep("b"), ep("c")))
    s.committed(first)
    for i in range(2, 10):
        d = s.schedule(req(shared + f"question {i}"), snap(ep("a"), ep("b"), ep("c")))
        assert d.primary == first.primary
        assert d.scores()[first.primary][1]["prefix-cache-scorer"] > 0.9


def test_the_prefill_estimate_is_the_prompt_and_what_each_pod_has_cached_and_remembers_nothing() -> None:
    s = scheduler()
    shared = "system prompt shared by a whole group of requests " * 20  # 1,000 chars: 250 tokens
    pool = snap(ep("a"), ep("b"))
    prompt = len(shared + "question 1") // 4
    assert s.prefill_by_endpoint(req(shared + "question 1"), pool) == (prompt, {})
    assert s.prefill_by_endpoint(req(shared + "question 1"), pool) == (prompt, {})  # not recorded
    first = s.schedule(req(shared + "question 1"), pool)
    s.committed(first)
    tokens, matched = s.prefill_by_endpoint(req(shared + "question 2"), pool)
    assert list(matched) == [first.primary] and tokens - matched[first.primary] < 16  # the shared blocks
    no_prefix = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
"""
    assert scheduler(no_prefix).prefill_by_endpoint(req("x" * 400), pool) == (100, {})  # the whole prompt


def test_stale_and_failing_endpoints_are_avoided_while_a_fresh_one_exists() -> None:
    s = scheduler()
    stale = ep("stale", kv=0.0, age=5.0)
    failing = ep("failing", kv=0.0, error="HTTP 500")
    fresh = ep("fresh", waiting=10, kv=0.95)
    for _ in range(20):
        assert s.schedule(req(), snap(stale, failing, fresh)).primary == "fresh"
    # With nothing fresh, everything is a candidate (better than refusing all traffic).
    d = s.schedule(req(), snap(stale, failing))
    assert d.primary in ("stale", "failing") and "no endpoint has fresh metrics" in d.reason()


def test_an_empty_pool_is_503_and_saturation_is_not_the_schedulers_business() -> None:
    s = scheduler()
    with pytest.raises(SchedulingError) as e:
        s.schedule(req(), snap())
    assert e.value.status == 503
    sheddable = req()
    sheddable.priority = -1  # admission (the director's) sheds it; the scheduler just schedules
    assert s.schedule(sheddable, snap(ep("a", waiting=100), ep("b", waiting=64))).primary == "b"


def test_sheddable_requests_are_refused_429_while_the_pool_reads_saturated() -> None:
    # The reference's legacy admission: the utilization detector's mean of
    # max(waiting / queueDepthThreshold, kv / kvCacheUtilThreshold) >= 1.0, stale endpoints at 1.0.
    detector = UtilizationDetector("d", Params({"queueDepthThreshold": 64, "kvCacheUtilThreshold": 0.9,
                                                "metricsStalenessThreshold": "2s"}, "d"))
    admission = SheddableAdmission(detector)
    sheddable = req()
    sheddable.priority = -1
    full = snap(ep("a", waiting=100), ep("b", waiting=64), ep("stale", age=9.0))
    refused = admission.admit(sheddable, full)
    assert refused is not None and refused.status == 429 and refused.err_type == "RateLimitError"
    assert admission.admit(req(), full) is None  # priority 0 (no objective) is never shed
    assert admission.admit(sheddable, snap(ep("a", waiting=64), ep("b", waiting=63))) is None  # mean < 1
    assert admission.admit(sheddable, snap(ep("a", waiting=70), ep("b", waiting=63))) is not None  # mean > 1
    assert admission.admit(sheddable, snap(ep("a", kv=0.95), ep("b", waiting=1))) is None
    assert admission.admit(sheddable, snap(ep("a", kv=0.95), ep("b", kv=0.9))) is not None


def test_burst_between_scrapes_spreads_over_the_pool() -> None:
    store = Datastore(staleness=2.0, clock=lambda: NOW)
    addrs = [f"10.0.0.{i}:8000" for i in range(4)]
    store.set_endpoints(addrs)
    for a in addrs:
        store.record_scrape(a, EngineSignals(), picks_at_start=0)
    s = scheduler()
    counts: Counter[str] = Counter()
    for i in range(40):  # distinct prompts, nothing finishes: all 40 are in flight
        d = s.schedule(req(f"unique prompt {i} " * 30), store.snapshot())
        s.committed(d)
        store.acquire(d.primary)
        counts[d.primary] += 1
    assert set(counts) == set(addrs) and max(counts.values()) - min(counts.values()) <= 1


def test_fallbacks_in_score_order_and_reason() -> None:
    text = DEFAULT_CONFIG.replace("- type: max-score-picker",
                                  "- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 3}")
    d = scheduler(text).schedule(req(), snap(ep("a", kv=0.5), ep("b", kv=0.1), ep("c", kv=0.9), ep("d", kv=0.3)))
    assert d.endpoints == ("b", "d", "a")
    assert d.reason().startswith("queue-scorer=1.00 kv-cache-utilization-scorer=0.90 prefix-cache-scorer=0.00")


def test_ties_break_at_random() -> None:
    s = scheduler()
    seen = {s.schedule(req(), snap(ep("a"), ep("b"), ep("c"))).primary for _ in range(60)}
    assert seen == {"a", "b", "c"}


def test_weighted_random_and_random_pickers() -> None:
    base = DEFAULT_CONFIG.replace("max-score-picker", "weighted-random-picker")
    s = scheduler(base)
    counts = Counter(s.schedule(req(), snap(ep("a", kv=0.0), ep("b", kv=0.99))).primary for _ in range(300))
    assert counts["a"] > counts["b"] > 0
    s = scheduler(DEFAULT_CONFIG.replace("max-score-picker", "random-picker"))
    counts = Counter(s.schedule(req(), snap(ep("a", kv=0.0), ep("b", kv=0.99))).primary for _ in range(300))
    assert min(counts.values()) > 100


def test_a_hot_prefix_spreads_once_its_holder_is_much_busier() -> None:
    from epp.scheduling.balance import spread_hot_prefixes

    eps = [ep("hot", running=30), ep("b", running=4), ep("c", running=20)]
    snap = Snapshot(tuple(eps), {"hot": 2}, {}, NOW, 2.0)
    # The least busy runs 4, so the limit is 4 x 1.5 + 4 = 10: the holders running 30 and 20 lose their match.
    assert spread_hot_prefixes([1.0, 0.0, 0.5], snap, eps, 4.0, 1.5) == [0.0, 0.0, 0.0]
    assert spread_hot_prefixes([1.0, 0.0, 0.5], snap, eps, 32.0, 1.5) == [1.0, 0.0, 0.5]  # within bounds
    assert spread_hot_prefixes([1.0, 0.0, 0.5], snap, eps, -1, 1.5) == [1.0, 0.0, 0.5]  # turned off
    # epp's own in-flight count counts when the scrape has not seen the load yet.
    quiet = [ep("hot"), ep("b")]
    snap = Snapshot(tuple(quiet), {"hot": 12}, {}, NOW, 2.0)
    assert spread_hot_prefixes([1.0, 0.0], snap, quiet, 4.0, 1.5) == [0.0, 0.0]


def test_spreading_reads_only_what_can_change_the_outcome_and_matches_the_rule() -> None:
    """The rule: a holder (score > 0) whose load is over min(load) x rel + abs loses its score, with
    load = max(epp's in-flight there, running + waiting). Checked over random pools."""
    import random

    from epp.scheduling.balance import spread_hot_prefixes

    rng = random.Random(7)
    for _ in range(400):
        n = rng.randint(2, 12)
        eps = [ep(f"p{i}", running=rng.randint(0, 20), waiting=rng.randint(0, 5)) for i in range(n)]
        inflight = {e.address: rng.randint(0, 25) for e in eps if rng.random() < 0.5}
        snap = Snapshot(tuple(eps), inflight, {}, NOW, 2.0)
        scores = [rng.choice((0.0, 0.0, 0.25, 1.0)) for _ in eps]
        abs_t, rel_t = rng.choice((4.0, 10.0, 0.0)), rng.choice((1.0, 1.5, 3.0))
        load = [max(inflight.get(e.address, 0), e.signals.running + e.signals.waiting) for e in eps]  # type: ignore[union-attr]
        limit = min(load) * rel_t + abs_t
        expected = [0.0 if s > 0 and load[i] > limit else s for i, s in enumerate(scores)]
        assert spread_hot_prefixes(scores, snap, eps, abs_t, rel_t) == expected
        assert spread_hot_prefixes(scores, snap, eps, abs_t, rel_t, snap.queued_and_loads(eps)[1]) == expected


def test_queues_and_loads_in_one_pass() -> None:
    eps = [ep("a", waiting=2, running=3), ep("b", waiting=0, running=1), ep("c", waiting=1, running=0),
           EndpointState("d")]
    # a: 2 in flight, both seen (recent 1 <= unseen -3): queue 2 + 1; load max(2, 5)
    # b: 4 in flight, 1 seen running: unseen 3 > recent 0: queue 0 + 3; load 4
    # c: nothing in flight; d: never scraped, 2 picked since: queue 2, load 2
    s = Snapshot(tuple(eps), {"a": 2, "b": 4, "d": 2}, {"a": 1, "d": 2}, NOW, 2.0)
    queued, loads = s.queued_and_loads(eps)
    assert queued == [3.0, 3.0, 1.0, 2.0] == s.queued_each(eps)
    assert loads == [5.0, 4, 1.0, 2]


@pytest.mark.parametrize("weights", [(0.0,), (2.0,), (2.0, 0.0), (2.0, 3.0), (2.0, 2.0, 3.0),
                                     (1.0, 0.5, 0.0, 2.0, 4.0)])
def test_weighted_sum_is_each_candidates_sum_of_weight_times_score(weights: tuple[float, ...]) -> None:
    from epp.scheduling.framework import weighted_sum

    scores = [[0.1 * (i + k) for i in range(5)] for k in range(len(weights))]
    expected = [sum(w * s[i] for w, s in zip(weights, scores, strict=True)) for i in range(5)]
    assert weighted_sum(scores, list(weights), 5) == pytest.approx(expected)


TOKEN_LOAD = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- {type: token-load-scorer, parameters: {queueThresholdTokens: 1000}}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 0}
  - {pluginRef: token-load-scorer, weight: 1}
"""


def test_token_load_counts_the_pods_pending_prefill_and_this_requests_uncached_part() -> None:
    s = scheduler(TOKEN_LOAD)
    pool = Snapshot((ep("a"), ep("b")), {}, {}, NOW, 2.0, inflight_tokens={"a": 600})
    d = s.schedule(req("x" * 800), pool)  # 200 tokens to compute on either pod
    scores = {a: v[1]["token-load-scorer"] for a, v in d.scores().items()}
    assert scores == {"a": pytest.approx(1 - 800 / 1000), "b": pytest.approx(1 - 200 / 1000)}
    assert d.primary == "b"
    crowded = Snapshot((ep("a"),), {}, {}, NOW, 2.0, inflight_tokens={"a": 5000})
    assert s.schedule(req("x" * 800), crowded).scores()["a"][1]["token-load-scorer"] == 0.0
    default = scheduler(TOKEN_LOAD.replace("queueThresholdTokens: 1000", "queueThresholdTokens: 0"))
    assert default.profile.scorers[1][0].threshold == 4 * 1024 * 1024  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"inFlightLoadProducerName: not supported by epp"):
        parse_config(TOKEN_LOAD.replace("queueThresholdTokens: 1000", "inFlightLoadProducerName: p"))
