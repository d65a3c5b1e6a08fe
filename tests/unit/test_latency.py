"""Predicted-latency routing: the online model, the producer's learning, and the reference's
latency scorer and filters, as pure functions of a snapshot and a stream of observations."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest

from epp.config import parse_config
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.latency import (
    LatencyPrediction,
    LatencyScorer,
    PredictedLatencyProducer,
    PrefixCacheAffinityFilter,
    PrefixRates,
    SLOHeadroomTierFilter,
)
from epp.scheduling.latency_model import (
    PRIOR_TTFT,
    TRAINED,
    ErrorTracker,
    Fit,
    LatencyModel,
    predict,
    tpot_features,
    ttft_features,
)
from epp.scheduling.params import Params
from epp.scheduling.types import Completion, ConfigError, CycleState, Usage

NOW = 100.0
CONFIG = (Path(__file__).resolve().parents[1] / "fixtures" / "latency-config.yaml").read_text()


def snap(*addrs: str, inflight: dict[str, int] | None = None, tokens: dict[str, int] | None = None,
         labels: dict[str, dict[str, str]] | None = None) -> Snapshot:
    eps = tuple(EndpointState(a, EngineSignals(), scraped_at=NOW, labels=(labels or {}).get(a, {})) for a in addrs)
    return Snapshot(eps, inflight or {}, {}, NOW, 2.0, tokens or {})


def req(prompt: str, headers: dict[str, str] | None = None, stream: bool = True) -> InferenceRequest:
    return InferenceRequest("id", "/v1/completions", model="m", prompt=prompt, headers=headers or {},
                            body={"stream": stream, "max_tokens": 16})


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# -- the model ---------------------------------------------------------------------------------------
def _simulate(model: LatencyModel, pod: str, slowdown: float, n: int, rng: random.Random) -> list[float]:
    errors = []
    for _ in range(n):
        tokens, batch = rng.uniform(0, 8000), rng.randint(0, 40)
        y = slowdown * (0.0105 + 0.00004 * tokens + 0.0001 * batch * (1 + tokens / 8192)) * rng.uniform(0.9, 1.1)
        x = ttft_features(tokens, batch)
        errors.append(abs(model.predict_ttft(pod, x) - y) / y)
        model.observe_ttft(pod, x, y)
    return errors


def test_each_pod_learns_its_own_speed_and_a_new_pod_starts_from_the_pool_mean() -> None:
    model, rng = LatencyModel(), random.Random(1)
    fast = _simulate(model, "fast", 1.0, 300, rng)
    slow = _simulate(model, "slow", 2.5, 300, rng)
    assert sum(fast[-100:]) / 100 < 0.15 and sum(slow[-100:]) / 100 < 0.15
    x = ttft_features(6000, 8)
    assert model.predict_ttft("slow", x) > 2 * model.predict_ttft("fast", x)
    assert model.trained("fast") == 300 and model.trained("new") == 0
    mean = model.pool_mean("ttft")
    assert model.pods["new"].ttft.theta == list(mean) if model.predict_ttft("new", x) else False
    assert model.predict_ttft("fast", x) < model.predict_ttft("new", x) < model.predict_ttft("slow", x)


def test_the_coefficients_read_are_the_fits_current_ones_after_every_observation() -> None:
    """(``coefficients`` keeps each pod's until it observes, and an untrained pod's until the pool
    mean it reads moves.)"""
    model, rng = LatencyModel(), random.Random(2)
    for i in range(400):
        pod = ("a", "b", "c")[i % 3]
        x = ttft_features(rng.uniform(0, 8000), rng.randint(0, 40))
        model.observe_ttft(pod, x, rng.uniform(0.01, 0.5))
        model.observe_tpot(pod, tpot_features(rng.randint(0, 40), rng.uniform(0, 4000)), rng.uniform(0.005, 0.05))
        for seen in ("a", "b", "c"):
            fits = model.pods.get(seen)
            if fits is not None and fits.ttft.n:
                assert model.coefficients(seen) == (fits.ttft.theta, fits.tpot.theta)
        # (the pool's mean as the model last computed it: it does so every few observations)
        assert model.coefficients("new") == (model._mean("ttft"), model._mean("tpot"))
    model.forget_pod("a")
    assert model.coefficients("a") == (model._mean("ttft"), model._mean("tpot"))


def test_an_untrained_pool_predicts_from_the_prior_and_never_below_half_a_millisecond() -> None:
    model = LatencyModel()
    assert model.pool_mean("ttft") == PRIOR_TTFT
    assert model.predict_ttft("p", ttft_features(0, 0)) == pytest.approx(PRIOR_TTFT[0])
    for _ in range(TRAINED + 5):
        model.observe_ttft("p", ttft_features(1000, 0), 0.0)  # a pod that answers at once
    assert model.predict_ttft("p", ttft_features(1000, 0)) >= 0.0005
    assert all(v >= 0 for v in model.pods["p"].ttft.theta)  # costs are never negative


def test_a_pod_that_slows_down_is_relearned() -> None:
    model, rng = LatencyModel(), random.Random(2)
    _simulate(model, "p", 1.0, 300, rng)
    late = _simulate(model, "p", 3.0, 300, rng)
    assert sum(late[-100:]) / 100 < 0.15


@pytest.mark.parametrize("shared", [False, True])
def test_fits_stay_on_the_observations_when_a_step_would_drive_a_coefficient_negative(shared: bool) -> None:
    # Pairs of responses per pod with correlated features: clamping an unconstrained step at 0
    # once moved this first pod's own fit away from what it observed (its error grew to 400%).
    model, rng = LatencyModel(shared=shared), random.Random(1)
    errors: dict[str, list[float]] = {p: [] for p in ("a", "b", "c", "d")}
    for _ in range(150):
        for pod, slowdown in (("a", 1.0), ("b", 1.0), ("c", 2.5), ("d", 2.5)):
            errors[pod] += _simulate(model, pod, slowdown, 2, rng)
    assert all(sum(e[-100:]) / 100 < 0.1 for e in errors.values())
    for pod in errors:
        assert all(v >= 0 for v in model.coefficients(pod)[0])
    x = ttft_features(6000, 8)
    assert model.predict_ttft("a", x) == pytest.approx(model.predict_ttft("b", x), rel=0.1)


def test_a_pod_whose_batch_stays_put_keeps_a_sane_fit() -> None:
    # A pod always 30-40 requests deep cannot tell its step from its batch term; clamped steps
    # once ran its fit to a 53 s step. Its idle prediction may be off, not absurd.
    model, rng = LatencyModel(), random.Random(3)
    for _ in range(300):
        tokens, batch = rng.uniform(0, 4000), rng.randint(30, 40)
        y = (0.0105 + 0.00004 * tokens + 0.0001 * batch * (1 + tokens / 8192)) * rng.uniform(0.9, 1.1)
        model.observe_ttft("busy", ttft_features(tokens, batch), y)
    assert 0.004 < model.predict_ttft("busy", ttft_features(100, 16)) < 0.05
    assert model.predict_ttft("busy", ttft_features(2000, 35)) == pytest.approx(0.0105 + 0.08 + 0.0035 * 1.25, rel=0.15)


def test_a_projected_step_holds_the_coefficient_at_zero_and_moves_towards_the_observation() -> None:
    fit = Fit.starting_at((0.01, 0.0, 0.05, 0.0))
    for _ in range(3):
        fit.update((1.0, 1.0, 0.0, 0.0), 0.05, 0.99)  # batch-free observations: 40 ms per 1k tokens
    x = (1.0, 2.0, 1.0, 2.0)
    before = fit.predict(x)
    fit.update(x, 0.05, 0.99)  # then one far below the prediction, with the batch term in it
    assert min(fit.theta) >= 0 and 0.05 <= fit.predict(x) < before


def test_shared_mode_learns_one_shape_and_each_pods_speed() -> None:
    model, rng = LatencyModel(shared=True), random.Random(4)
    errors: dict[str, list[float]] = {p: [] for p in ("a", "b", "c", "d")}
    for _ in range(150):  # the pods' responses interleave, as they do in a pool
        for pod, slowdown in (("a", 1.0), ("b", 1.0), ("c", 2.5), ("d", 2.5)):
            errors[pod] += _simulate(model, pod, slowdown, 2, rng)
    assert all(sum(e[-100:]) / 100 < 0.15 for e in errors.values())
    x = ttft_features(6000, 8)
    fast, slow = model.predict_ttft("a", x), model.predict_ttft("c", x)
    assert slow / fast == pytest.approx(2.5, rel=0.15)
    # Pods alike are predicted alike: each pod's coefficients are its factor x one shared fit.
    assert model.predict_ttft("b", x) == pytest.approx(fast, rel=0.05)
    ratios = {a / b for a, b in zip(model.coefficients("a")[0], model.coefficients("c")[0], strict=True) if b}
    assert max(ratios) - min(ratios) < 1e-9
    # A new pod starts at the pool's typical speed (the factors' geometric mean is kept at 1).
    assert model.trained("new") == 0
    assert fast < model.predict_ttft("new", x) < slow
    assert model.predict_ttft("new", x) == pytest.approx((fast * slow) ** 0.5, rel=0.1)
    assert sorted(model.known_pods()) == ["a", "b", "c", "d"]
    model.forget_pod("c")
    assert model.trained("c") == 0 and "c" not in model.known_pods()


def test_shared_mode_relearns_a_pod_that_slows_down_without_moving_the_others() -> None:
    model, rng = LatencyModel(shared=True), random.Random(5)
    for _ in range(150):
        for pod in ("a", "b", "c"):
            _simulate(model, pod, 1.0, 2, rng)
    x = ttft_features(4000, 8)
    before = model.predict_ttft("a", x)
    late: list[float] = []
    for _ in range(150):
        for pod, slowdown in (("a", 1.0), ("b", 1.0), ("c", 3.0)):
            errs = _simulate(model, pod, slowdown, 2, rng)
            if pod == "c":
                late += errs
    assert sum(late[-100:]) / 100 < 0.15
    assert model.predict_ttft("c", x) / model.predict_ttft("a", x) == pytest.approx(3.0, rel=0.2)
    assert model.predict_ttft("a", x) == pytest.approx(before, rel=0.3)


def test_pod_model_is_a_producer_parameter_and_refuses_other_values() -> None:
    _, producer = built(CONFIG.replace("{streamingMode: true}", "{streamingMode: true, podModel: speed}"))
    assert producer.model.shared
    _, producer = built()
    assert not producer.model.shared
    with pytest.raises(ConfigError, match="podModel"):
        built(CONFIG.replace("{streamingMode: true}", "{streamingMode: true, podModel: fast}"))


def test_the_error_tracker_falls_back_and_recovers_with_messages() -> None:
    t = ErrorTracker(window=100, min_samples=50)
    messages = [m for _ in range(64) if (m := t.add(1.0, 0.4))]
    assert not t.trusted and t.fallbacks == 1 and "above 50%" in messages[0]
    messages = [m for _ in range(200) if (m := t.add(1.0, 1.05))]
    assert t.trusted and "back to" in messages[-1]
    assert sum(t.buckets) == t.samples == 264


# -- the producer -----------------------------------------------------------------------------------
def built(text: str = CONFIG) -> tuple[Any, PredictedLatencyProducer]:
    s, _ = parse_config(text).build()
    return s, s.profile.producers[0]


def serve(s: Any, producer: PredictedLatencyProducer, clock: Clock, pool: Snapshot, prompt: str, ttft: float,
          tpot: float, tokens: int = 16, cached: int = 0) -> str:
    d = s.schedule(req(prompt), pool)
    s.committed(d)
    clock.t += ttft
    s.prefill_done(d)
    clock.t += tpot * (tokens - 1)
    s.completed(d, Completion(Usage(len(prompt) // 4, cached, tokens), True))
    return str(d.primary)


def test_the_producer_learns_from_streams_and_routes_away_from_a_slow_pod() -> None:
    s, producer = built()
    clock = Clock()
    producer.clock = clock
    pool = snap("fast", "slow")
    speed = {"fast": 1.0, "slow": 3.0}
    for i in range(200):
        pod_prompt = f"question {i} " * 50
        d = s.schedule(req(pod_prompt), pool)
        s.committed(d)
        clock.t += speed[d.primary] * 0.02
        s.prefill_done(d)
        clock.t += speed[d.primary] * 0.007 * 15
        s.completed(d, Completion(Usage(len(pod_prompt) // 4, 0, 16), True))
    x = ttft_features(150, 0)
    assert producer.model.predict_ttft("slow", x) > 2 * producer.model.predict_ttft("fast", x)
    picks = [s.schedule(req(f"new {i} " * 50), pool).primary for i in range(20)]
    assert picks.count("fast") == 20
    families = {f.name: f for f in producer.metric_families("pool")}
    assert families["epp_latency_prediction_active"].samples[0].value == 1.0
    assert families["epp_latency_prediction_samples"].samples[0].value == 200


def test_a_non_streamed_response_teaches_ttft_from_its_end_to_end_time() -> None:
    s, producer = built()
    clock = Clock()
    producer.clock = clock
    pool = snap("a")
    for i in range(30):
        d = s.schedule(req(f"q {i} " * 50, stream=False), pool)
        s.committed(d)
        clock.t += 0.05 + 0.0065 * 15  # the whole response at once
        s.prefill_done(d)
        s.completed(d, Completion(Usage(100, 0, 16), False))
    assert producer.model.trained("a") == 30
    assert producer.model.predict_ttft("a", ttft_features(100, 0)) == pytest.approx(0.05, rel=0.4)


def test_a_response_without_usage_or_past_context_ttl_teaches_nothing() -> None:
    s, producer = built(CONFIG.replace("{streamingMode: true}", "{streamingMode: true, contextTTL: 10s}"))
    clock = Clock()
    producer.clock = clock
    pool = snap("a")
    d = s.schedule(req("x " * 100), pool)
    s.committed(d)
    s.prefill_done(d)
    s.completed(d, Completion(None, True, ok=False))  # failed
    d = s.schedule(req("z " * 100), pool)
    s.committed(d)
    s.prefill_done(d)
    s.completed(d, Completion(None, False))  # a whole body without usage: no TTFT to tell apart
    d = s.schedule(req("y " * 100), pool)
    s.committed(d)
    clock.t += 11
    s.prefill_done(d)
    s.completed(d, Completion(Usage(50, 0, 4), True))
    assert producer.model.trained("a") == 0


def test_a_stream_read_to_its_first_bytes_only_teaches_the_ttft_fit_alone() -> None:
    s, producer = built()
    clock = Clock()
    producer.clock = clock
    pool = snap("a")
    for i in range(5):
        d = s.schedule(req(f"question {i} " * 50), pool)
        s.committed(d)
        clock.t += 0.05
        s.prefill_done(d)
        clock.t += 1.0
        s.completed(d, Completion(None, True))  # observed responses: usage read from a sample only
    fits = producer.model.pods["a"]
    assert (fits.ttft.n, fits.tpot.n) == (5, 0)
    assert producer.errors.cumulative()  # the closed loop counts them too


def test_large_errors_stop_publishing_and_the_scorer_falls_back_to_its_composite() -> None:
    s, producer = built()
    clock = Clock()
    producer.clock = clock
    pool = snap("a", "b")
    rng = random.Random(3)
    for i in range(80):  # wildly varying latencies no feature explains
        serve(s, producer, clock, pool, f"q{i} " * 40, rng.choice((0.001, 2.0)), 0.001)
    assert not producer.errors.trusted
    d = s.schedule(req("z " * 40), pool)
    # The composite: KV free (1) and queue (1) count, no prefix cached: 2/3 on both.
    assert producer.predictions(d.cycle) is None and d.totals == [0.67, 0.67]
    families = {f.name: f for f in producer.metric_families("pool")}
    assert families["epp_latency_prediction_active"].samples[0].value == 0.0
    assert families["epp_latency_prediction_fallbacks"].samples[0].value == 1


def test_slo_headers_give_headroom_and_streaming_mode_decides_whether_tpot_counts() -> None:
    _, producer = built()
    cycle = CycleState()
    producer.produce(req("p " * 40, {"x-llm-d-slo-ttft-ms": "500", "x-slo-tpot-ms": "1"}), snap("a"),
                     list(snap("a").endpoints), cycle)
    p = producer.predictions(cycle)["a"]  # type: ignore[index]
    assert p.ttft_headroom == pytest.approx(0.5 - p.ttft) and p.tpot_headroom == pytest.approx(0.001 - p.tpot)
    assert p.ttft_headroom > 0 > p.tpot_headroom and not p.meets_slo
    _, plain = built(CONFIG.replace("{streamingMode: true}", "{endpointRoleLabel: llm-d.ai/role}"))
    cycle = CycleState()
    pool = snap("a", labels={"a": {"llm-d.ai/role": "prefill"}})
    plain.produce(req("p " * 40, {"x-llm-d-slo-ttft-ms": "500"}), pool, list(pool.endpoints), cycle)
    q = plain.predictions(cycle)["a"]  # type: ignore[index]
    assert q.tpot_headroom == 0.0
    # Not streaming: the TTFT SLO is held against the whole response (16 tokens at the TPOT).
    assert q.ttft_headroom == pytest.approx(0.5 - q.ttft - 15 * q.tpot)


def test_the_producers_parameters_follow_the_reference() -> None:
    p = PredictedLatencyProducer("p", Params({"samplingMean": 100, "sloBufferFactor": 0.9,
                                              "predictInProduce": False}, "plugins[0].parameters"))
    assert p.buffer == 0.9 and not p.publish
    for bad, message in (({"useEncoderCacheFeatures": True}, "not supported by epp"),
                         ({"inFlightLoadProducerName": "x"}, "not supported by epp"),
                         ({"contextTTL": "soon"}, "contextTTL"), ({"nope": 1}, "unknown parameter")):
        with pytest.raises(ConfigError, match=message):
            PredictedLatencyProducer("p", Params(bad, "plugins[0].parameters"))


# -- the scorer and filters --------------------------------------------------------------------------
def pred(ttft: float, tpot: float = 0.01, ttft_slo: float = 0.0, tpot_slo: float = 0.0,
         dispatched: int = 1) -> LatencyPrediction:
    return LatencyPrediction(ttft, tpot, ttft_slo - ttft, tpot_slo - tpot if tpot_slo else 0.0, dispatched)


class Fixed(PredictedLatencyProducer):
    def __init__(self, predictions: dict[str, LatencyPrediction]) -> None:
        super().__init__("fixed", Params({}, "p"))
        self.fixed = predictions

    def predictions(self, cycle: CycleState) -> dict[str, LatencyPrediction] | None:
        return self.fixed


def scorer(predictions: dict[str, LatencyPrediction], **params: Any) -> LatencyScorer:
    s = LatencyScorer("latency-scorer", Params(params, "p"))
    s.bind_latency_producer(Fixed(predictions))
    return s


def scores(s: LatencyScorer, pool: Snapshot) -> list[float]:
    return s.score(req("x"), pool, list(pool.endpoints), CycleState())


def test_without_slo_the_lowest_predicted_latency_scores_highest() -> None:
    pool = snap("a", "b", "c")
    out = scores(scorer({"a": pred(0.3), "b": pred(0.1), "c": pred(0.2)}), pool)
    assert out[0] == 0.01 and out[1] == 1.0 and 0.49 <= out[2] <= 0.51


def test_positive_headroom_is_scored_alone_least_packs_and_most_spreads() -> None:
    pool = snap("a", "b", "c")
    preds = {"a": pred(0.1, ttft_slo=0.5), "b": pred(0.4, ttft_slo=0.5), "c": pred(0.9, ttft_slo=0.5)}
    least = scores(scorer(preds), pool)
    most = scores(scorer(preds, headroomSelectionStrategy="most"), pool)
    assert least[2] == most[2] == 0.0  # misses its SLO
    assert least[1] > least[0] and most[0] > most[1]


def test_all_negative_prefers_idle_pods_then_the_least_severe_deficit() -> None:
    pool = snap("a", "b", "c")
    idle = scores(scorer({"a": pred(0.9, ttft_slo=0.1), "b": pred(2.0, ttft_slo=0.1, dispatched=0),
                          "c": pred(0.5, ttft_slo=0.1)}), pool)
    assert idle[1] > 0 and idle[0] == idle[2] == 0
    buckets = scores(scorer({"a": pred(0.9, ttft_slo=0.1, tpot_slo=0.001),  # both missed
                             "b": pred(0.05, 0.01, ttft_slo=0.1, tpot_slo=0.001),  # TPOT only
                             "c": pred(0.5, ttft_slo=0.1)}), pool)  # TTFT only
    assert buckets[1] > 0 and buckets[0] == buckets[2] == 0


def test_no_predictions_falls_back_to_kv_queue_and_prefix() -> None:
    s = LatencyScorer("latency-scorer", Params({}, "p"))
    eps = (EndpointState("a", EngineSignals(waiting=4, kv_usage=0.5), scraped_at=NOW),
           EndpointState("b", EngineSignals(waiting=0, kv_usage=0.1), scraped_at=NOW))
    out = s.score(req("x"), Snapshot(eps, {}, {}, NOW, 2.0), list(eps), CycleState())
    assert out[1] > out[0] and out[0] == pytest.approx((0.5 + 0.0 + 0.0) / 3, abs=0.01)


def test_the_tier_filter_keeps_the_pods_meeting_the_slo_and_explores_the_others() -> None:
    f = SLOHeadroomTierFilter("tier", Params({"epsilonExploreNeg": 0.5}, "p"), rng=random.Random(4))
    f.bind_latency_producer(Fixed({"a": pred(0.1, ttft_slo=0.2), "b": pred(0.5, ttft_slo=0.2)}))
    pool = snap("a", "b")
    kept = [tuple(c.address for c in f.filter(req("x"), pool, list(pool.endpoints), CycleState()))
            for _ in range(200)]
    assert set(kept) == {("a",), ("b",)} and 60 < kept.count(("a",)) < 140
    f.bind_latency_producer(Fixed({"a": pred(0.5, ttft_slo=0.2), "b": pred(0.6, ttft_slo=0.2)}))
    assert len(f.filter(req("x"), pool, list(pool.endpoints), CycleState())) == 2  # one tier: all stay


AFFINITY = CONFIG.replace("""- type: latency-scorer""", """- type: prefix-cache-affinity-filter
  parameters: {ttftSource: latencyPredictor, maxTTFTPenaltyMs: 200}
- type: latency-scorer""").replace("""  - pluginRef: latency-scorer""", """  - pluginRef: prefix-cache-affinity-filter
  - pluginRef: latency-scorer""")


def test_the_affinity_filter_sticks_to_the_cached_pod_until_its_predicted_ttft_is_too_far_behind() -> None:
    s, _ = built(AFFINITY)
    assert isinstance(s.profile.filters[0], PrefixCacheAffinityFilter) and s.profile.filters[0].prefix is not None
    prompt = "a shared system prompt " * 200
    pool = snap("a", "b")
    first = s.schedule(req(prompt), pool)
    s.committed(first)  # the filter records the blocks there
    cached = first.primary
    other = "b" if cached == "a" else "a"
    # Some pending work on the cached pod: the prediction there is worse, yet within the penalty.
    busy = snap("a", "b", tokens={cached: 2000}, inflight={cached: 2})
    assert s.schedule(req(prompt + " q1"), busy).primary == cached
    flooded = snap("a", "b", tokens={cached: 40000}, inflight={cached: 30})
    assert s.schedule(req(prompt + " q2"), flooded).primary == other


def test_the_affinity_filter_with_prefill_throughput_reads_epps_pending_tokens() -> None:
    f = PrefixCacheAffinityFilter("aff", Params({"maxTTFTPenaltyMs": 100, "peakPrefillThroughput": 10000}, "p"))
    assert not f.uses_latency
    with pytest.raises(ConfigError, match="peakPrefillThroughput"):
        PrefixCacheAffinityFilter("aff", Params({"peakPrefillThroughput": 0}, "p"))
    with pytest.raises(ConfigError, match="must be one of"):
        PrefixCacheAffinityFilter("aff", Params({"ttftSource": "magic"}, "p"))


def test_the_reference_chart_latency_profile_loads_and_binds_one_producer() -> None:
    text = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: predicted-latency-producer
- name: strict-affinity-filter
  type: prefix-cache-affinity-filter
  parameters: {affinityThreshold: 0.99, ttftSource: latencyPredictor, maxTTFTPenaltyMs: 5000}
- name: loose-affinity-filter
  type: prefix-cache-affinity-filter
  parameters: {affinityThreshold: 0.80, ttftSource: latencyPredictor, maxTTFTPenaltyMs: 5000}
- type: latency-scorer
- type: weighted-random-picker
- type: slo-headroom-tier-filter
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: predicted-latency-producer
  - pluginRef: strict-affinity-filter
  - pluginRef: slo-headroom-tier-filter
  - pluginRef: loose-affinity-filter
  - pluginRef: latency-scorer
  - pluginRef: weighted-random-picker
"""
    s, producer = built(text)
    assert len(s.profile.producers) == 1 and len(s.profile.filters) == 3
    assert all(f.producer is producer for f in s.profile.filters if hasattr(f, "latency_producer_name"))
    prefix = {id(f.prefix) for f in s.profile.filters if isinstance(f, PrefixCacheAffinityFilter)}
    assert prefix == {id(producer.prefix)}  # one prefix index for all of them
    d = s.schedule(req("hello " * 20), snap("a", "b"))
    assert d.primary in ("a", "b")


def test_latency_readers_get_a_producer_made_for_them_and_names_are_checked() -> None:
    text = CONFIG.replace("- type: predicted-latency-producer\n  parameters: {streamingMode: true}\n", "").replace(
        "  - pluginRef: predicted-latency-producer\n", "")
    s, producer = built(text)
    assert isinstance(producer, PredictedLatencyProducer) and s.profile.scorers[0][0].producer is producer
    with pytest.raises(ConfigError, match=r"latencyPredictionInfoProducerName: no plugin named 'nope'"):
        parse_config(CONFIG.replace("- type: latency-scorer", "- type: latency-scorer\n  parameters: "
                                    "{latencyPredictionInfoProducerName: nope}"))
    with pytest.raises(ConfigError, match=r"is a max-score-picker, not a predicted-latency-producer"):
        parse_config(CONFIG.replace("- type: latency-scorer", "- type: latency-scorer\n  parameters: "
                                    "{latencyPredictionInfoProducerName: max-score-picker}"))
    with pytest.raises(ConfigError, match="only scorers take a weight"):
        parse_config(CONFIG.replace("  - pluginRef: predicted-latency-producer",
                                    "  - {pluginRef: predicted-latency-producer, weight: 2}"))


def test_the_latency_slo_admitter_sheds_sheddable_requests_no_pod_can_serve_in_time() -> None:
    from epp.requestcontrol.admitters import LatencySLOAdmitter

    admitter = LatencySLOAdmitter("adm", Params({}, "p"))
    _, producer = built()
    admitter.bind_latency_producer(producer)
    busy = tuple(EndpointState(a, EngineSignals(running=8, kv_usage=0.5), scraped_at=NOW) for a in ("a", "b"))
    pool = Snapshot(busy, {"a": 8, "b": 8}, {}, NOW, 2.0, {"a": 30000, "b": 30000})
    tight = req("x " * 40, {"x-llm-d-slo-ttft-ms": "5"})
    tight.priority = -1
    refused = admitter.admit(tight, pool)
    assert refused is not None and refused.status == 429 and "predicted to meet" in refused.message
    # Streaming mode: a TPOT SLO is needed too (none counts as 0, as in the reference).
    loose = req("x " * 40, {"x-llm-d-slo-ttft-ms": "60000", "x-llm-d-slo-tpot-ms": "1000"})
    loose.priority = -1
    assert admitter.admit(loose, pool) is None
    tight.priority = 0  # not sheddable: always admitted
    assert admitter.admit(tight, pool) is None
    no_slo = req("x " * 40)
    no_slo.priority = -1
    assert admitter.admit(no_slo, pool) is None
    idle = tuple(EndpointState(a, EngineSignals(running=0, kv_usage=0.5), scraped_at=NOW) for a in ("a", "b"))
    tight.priority = -1
    assert admitter.admit(tight, Snapshot(idle, {}, {}, NOW, 2.0, {"a": 30000})) is None


def test_the_reference_chart_config_with_the_latency_admitter_loads() -> None:
    text = CONFIG.replace("- type: max-score-picker", "- type: max-score-picker\n- type: latency-slo-admitter")
    cfg = parse_config(text)
    s, instances = cfg.build()
    admitter = cfg.runtime(instances).admitters[0]
    assert admitter.producer is s.profile.producers[0]  # type: ignore[attr-defined]


def test_a_pod_running_a_tight_tpot_slo_lowers_the_headroom_of_new_requests_there() -> None:
    s, producer = built()
    pool = snap("a")
    strict = req("x " * 40, {"x-llm-d-slo-tpot-ms": "2"})
    d = s.schedule(strict, pool)
    s.committed(d)
    assert producer.running_slos.tightest("a") == 0.002
    relaxed = s.schedule(req("y " * 40, {"x-llm-d-slo-tpot-ms": "500"}), pool)
    p = producer.predictions(relaxed.cycle)["a"]  # type: ignore[index]
    assert p.tpot_headroom == pytest.approx(0.002 - p.tpot)
    s.completed(d, Completion(None, True))
    assert producer.running_slos.tightest("a") == 0.0


def test_the_reference_charts_latency_predictor_config_loads_as_rendered() -> None:

    from epp.config import load_config

    path = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "chart-latency-predictor-plugins.yaml"
    cfg = load_config(str(path))
    s, instances = cfg.build()
    producer = s.profile.producers[0]
    assert [type(f).__name__ for f in s.profile.filters] == ["PrefixCacheAffinityFilter", "SLOHeadroomTierFilter",
                                                             "PrefixCacheAffinityFilter"]
    assert cfg.runtime(instances).admitters[0].producer is producer  # type: ignore[attr-defined]
    d = s.schedule(req("hello " * 30, {"x-llm-d-slo-ttft-ms": "300"}), snap("a", "b", "c"))
    assert d.primary in ("a", "b", "c")


def test_prefer_idle_false_lets_a_busy_cached_pod_beat_an_idle_cold_one() -> None:
    pool = snap("cached", "idle")
    preds = {"cached": pred(0.02, dispatched=3), "idle": pred(0.3, dispatched=0)}
    ref = scores(scorer(preds), pool)
    assert ref[0] == 0.0 < ref[1]  # the reference's rule: an idle pod first
    out = scores(scorer(preds, preferIdle=False), pool)
    assert out[0] > out[1]


def test_the_recommended_profile_loads_and_routes_by_predicted_latency() -> None:

    from epp.config import load_config

    path = Path(__file__).resolve().parents[2] / "epp" / "profiles" / "recommended.yaml"
    s, _ = load_config(str(path)).build()
    assert [type(p).__name__ for p in s.profile.producers] == ["PredictedLatencyProducer"]
    scorer_ = s.profile.scorers[0][0]
    assert isinstance(scorer_, LatencyScorer) and not scorer_.prefer_idle and s.profile.producers[0].streaming
    assert scorer_.work == 0.25 and scorer_.horizon == 30.0 and s.profile.producers[0].locality_horizon == 30.0
    assert scorer_.trade_limit == 0.25 and scorer_.locality_weight == 4 and scorer_.backlog_risk == 0.3


def streamed(ttft: float, tpot: float) -> LatencyPrediction:
    """A prediction as the producer makes it for a stream without SLOs: both headrooms negative."""
    return LatencyPrediction(ttft, tpot, -ttft, -tpot, 1)


def test_a_tpot_trade_limit_bounds_the_ttft_a_better_tpot_may_buy() -> None:
    pool = snap("slow-holder", "fast-cold", "slow-cold")
    preds = {"slow-holder": streamed(0.04, 0.02), "fast-cold": streamed(0.13, 0.008),
             "slow-cold": streamed(0.6, 0.02)}
    plain = scores(scorer(preds, preferIdle=False), pool)
    assert plain[1] > plain[0]  # ranked against the slowest candidate, 90 ms more TTFT look cheap
    bounded = scores(scorer(preds, preferIdle=False, tpotTradeLimit=0.25), pool)
    assert bounded[0] > bounded[1] > bounded[2] == 0.01  # past the limit its TTFT ranks as the worst
    near = {**preds, "fast-cold": streamed(0.045, 0.008)}  # 12.5% more TTFT for less than half the TPOT
    within = scores(scorer(near, preferIdle=False, tpotTradeLimit=0.25), pool)
    assert within[1] > within[0]


def test_backlog_risk_prefers_a_short_queue_to_a_slightly_faster_long_one() -> None:
    pool = snap("behind-4k", "behind-none")
    long_queue = LatencyPrediction(0.100, 0.01, -0.100, -0.01, 3, backlog=4.0)
    short_queue = LatencyPrediction(0.120, 0.01, -0.120, -0.01, 1, backlog=0.5)
    preds = {"behind-4k": long_queue, "behind-none": short_queue}
    plain = scores(scorer(preds, preferIdle=False), pool)
    assert plain[0] > plain[1]  # 20 ms sooner as predicted
    risky = scores(scorer(preds, preferIdle=False, backlogRisk=0.15), pool)
    assert risky[1] > risky[0]  # 0.100 x 1.6 against 0.120 x 1.075
    with pytest.raises(ConfigError, match="backlogRisk"):
        LatencyScorer("latency-scorer", Params({"backlogRisk": -0.1}, "p"))


def test_the_tpot_trade_limit_is_not_negative() -> None:
    with pytest.raises(ConfigError, match="tpotTradeLimit"):
        LatencyScorer("latency-scorer", Params({"tpotTradeLimit": -1}, "p"))


def test_prefill_work_weight_prefers_waiting_for_a_cached_prefix_to_recomputing_it_elsewhere() -> None:
    pool = snap("cached", "other")
    wait = LatencyPrediction(0.187, 0.01, -0.187, -0.01, 3, 0.0, 0.001)
    recompute = LatencyPrediction(0.182, 0.01, -0.182, -0.01, 2, 0.0, 0.137)
    preds = {"cached": wait, "other": recompute}
    plain = scores(scorer(preds, preferIdle=False), pool)
    assert plain[1] > plain[0]  # a few ms sooner, at the price of 137 ms of GPU time
    weighted = scores(scorer(preds, preferIdle=False, prefillWorkWeight=0.25), pool)
    assert weighted[0] > weighted[1]


def test_the_composite_fallback_scores_the_prefix_as_a_share_of_this_prompt() -> None:
    from epp.scheduling.types import MATCHED_TOKENS

    s = LatencyScorer("latency-scorer", Params({"compositeKVWeight": 0, "compositeQueueWeight": 0}, "p"))
    eps = (EndpointState("a", EngineSignals(), scraped_at=NOW), EndpointState("b", EngineSignals(), scraped_at=NOW))
    cycle = CycleState()
    cycle.put(MATCHED_TOKENS, {"a": 100})
    out = s.score(req("x" * 800), Snapshot(eps, {}, {}, NOW, 2.0), list(eps), cycle)  # 200 tokens, half cached on a
    assert out == [0.5, 0.0]


# -- locality: what caching a popular prefix on a faster pod saves its next requests ---------------
def scorer_params(params: str) -> str:
    return CONFIG.replace("- type: latency-scorer", f"- type: latency-scorer\n  parameters: {{{params}}}")


LOCALITY = scorer_params("preferIdle: false, localityHorizon: 30s")
SYSTEM = "you are a helpful assistant who answers in full sentences. " * 100  # ~1,500 tokens, cached


def trained(text: str) -> tuple[Any, PredictedLatencyProducer]:
    s, producer = built(text)
    rng = random.Random(7)
    _simulate(producer.model, "fast", 1.0, 300, rng)
    _simulate(producer.model, "slow", 2.5, 300, rng)
    return s, producer


def place_on_slow(s: Any, times: int) -> None:
    """Requests for SYSTEM while only the slow pod serves: the prefix is cached there alone."""
    for i in range(times):
        d = s.schedule(req(SYSTEM + f"question {i}?"), snap("slow"))
        s.committed(d)


def test_prefix_rates_decay_over_the_horizon_and_drop_the_least_recently_seen() -> None:
    rates = PrefixRates(limit=2)
    rates.add(1, 0.0, 10.0)
    rates.add(1, 0.0, 10.0)
    assert rates.count(1, 0.0, 10.0) == 2.0
    assert abs(rates.count(1, 10.0, 10.0) - 2.0 / math.e) < 1e-9
    rates.add(2, 1.0, 10.0)
    rates.add(1, 2.0, 10.0)  # 1 is the most recently seen now
    rates.add(3, 3.0, 10.0)
    assert len(rates) == 2 and rates.count(2, 3.0, 10.0) == 0.0 and rates.count(1, 3.0, 10.0) > 1.0


def test_a_popular_prefix_on_a_slow_pod_is_computed_again_on_a_fast_one() -> None:
    s, _ = trained(LOCALITY)
    place_on_slow(s, 2)  # one request since it was cached: a recompute would not pay for itself
    both = snap("fast", "slow")
    assert s.schedule(req(SYSTEM + "and now?"), both).primary == "slow"
    place_on_slow(s, 40)  # 41 requests over the horizon: as many are expected to save ~15 ms each
    assert s.schedule(req(SYSTEM + "and now?"), both).primary == "fast"


def test_a_locality_weight_copies_a_prefix_after_fewer_requests() -> None:
    picks = {}
    for weight in (1, 4):
        s, _ = trained(scorer_params(f"preferIdle: false, localityHorizon: 30s, localityWeight: {weight}"))
        place_on_slow(s, 4)
        picks[weight] = s.schedule(req(SYSTEM + "and now?"), snap("fast", "slow")).primary
    assert picks == {1: "slow", 4: "fast"}
    with pytest.raises(ConfigError, match="localityWeight"):
        parse_config(scorer_params("localityWeight: -1"))


def test_without_a_locality_horizon_the_slow_holder_keeps_the_prefix() -> None:
    s, _ = trained(scorer_params("preferIdle: false"))
    place_on_slow(s, 42)
    assert s.schedule(req(SYSTEM + "and now?"), snap("fast", "slow")).primary == "slow"


def locality_after_40_on(s: Any, producer: PredictedLatencyProducer, holder: str, other: str) -> dict[str, float]:
    """Each pod's locality credit for SYSTEM once 40 requests for it went to ``holder`` alone."""
    for i in range(40):
        s.committed(s.schedule(req(SYSTEM + f"question {i}?"), snap(holder)))
    cycle = CycleState()
    pool = snap(holder, other)
    producer.produce(req(SYSTEM + "and now?"), pool, list(pool.endpoints), cycle)
    predictions = producer.predictions(cycle)
    assert predictions is not None
    return {a: p.locality for a, p in predictions.items()}


def test_pods_alike_are_not_worth_a_second_copy_of_a_prefix() -> None:
    s, producer = built(LOCALITY)
    rng = random.Random(3)
    for pod in ("a", "b"):
        _simulate(producer.model, pod, 1.0, 300, rng)
    assert set(locality_after_40_on(s, producer, "a", "b").values()) == {0.0}


def test_a_copy_is_judged_by_the_pods_speed_factors_not_by_their_own_fits() -> None:
    # Two alike pods, one always busy: its own fit cannot tell its step from its batch term and
    # predicts it well over 20% faster when idle; on the shared fit the two are alike.
    s, producer = built(LOCALITY)
    rng = random.Random(3)
    model = producer.model
    for _ in range(300):
        for pod, depth in (("busy", (30, 40)), ("quiet", (0, 2))):
            tokens, batch = rng.uniform(0, 4000), rng.randint(*depth)
            y = (0.0105 + 0.00004 * tokens + 0.0001 * batch * (1 + tokens / 8192)) * rng.uniform(0.9, 1.1)
            model.observe_ttft(pod, ttft_features(tokens, batch), y)
    idle = ttft_features(100, 16)
    assert model.predict_ttft("busy", idle) < 0.8 * model.predict_ttft("quiet", idle)
    busy_factor, quiet_factor = model.speed_factors()["busy"][0], model.speed_factors()["quiet"][0]
    assert busy_factor == pytest.approx(quiet_factor, rel=0.2)
    assert locality_after_40_on(s, producer, "quiet", "busy")["busy"] == 0.0


def test_the_locality_horizon_is_a_positive_duration() -> None:
    with pytest.raises(ConfigError, match="localityHorizon"):
        parse_config(scorer_params("localityHorizon: -5"))
    assert LatencyScorer("l", Params({}, "p")).horizon == 0.0
    assert LatencyScorer("l", Params({"localityHorizon": "1m"}, "p")).horizon == 60.0


def test_the_gpu_time_of_a_copy_is_shared_by_the_requests_expected_to_reuse_it() -> None:
    s, producer = trained(scorer_params("preferIdle: false, localityHorizon: 30s, prefillWorkWeight: 1"))
    place_on_slow(s, 2)
    pool = snap("fast", "slow")

    def own_prefill() -> float:
        cycle = CycleState()
        producer.produce(req(SYSTEM + "and now?"), pool, list(pool.endpoints), cycle)
        predictions = producer.predictions(cycle)
        assert predictions is not None
        return predictions["fast"].own_prefill

    rare = own_prefill()
    place_on_slow(s, 40)
    assert 0 < own_prefill() < rare / 20


def test_a_pods_ttft_factor_times_the_shared_fit_is_its_speed_coefficients_prediction() -> None:
    model = LatencyModel()
    rng = random.Random(5)
    _simulate(model, "fast", 1.0, 200, rng)
    _simulate(model, "slow", 2.5, 200, rng)
    for pod in ("fast", "slow", "new"):
        shared = predict((model.pool_ttft.theta, model.pool_tpot.theta), 1500, 12, 0)[0]
        assert model.ttft_factor(pod) * shared == pytest.approx(
            predict(model.speed_coefficients(pod), 1500, 12, 0)[0], rel=1e-9)
    assert model.ttft_factor("new") == 1.0
    assert model.ttft_factor("slow") > 2.0 * model.ttft_factor("fast")
