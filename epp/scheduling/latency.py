"""Predicted-latency routing with the reference's config surface, on epp's in-process model.

- ``predicted-latency-producer`` (a data producer): per candidate, this request's predicted TTFT
  and TPOT from ``epp.scheduling.latency_model`` (each pod's own fit, learned from the responses
  it served), and the headroom against the request's SLO headers (``x-llm-d-slo-ttft-ms``,
  ``x-llm-d-slo-tpot-ms``, or their old ``x-slo-*`` names): ``SLO - predicted``, or
  ``-predicted`` without an SLO. It learns from every response that reports its usage: TTFT at
  the first bytes of a stream, TPOT over the rest of it; a non-streamed response teaches TTFT as
  its end-to-end time less its tokens at the predicted TPOT. When its median TTFT error over
  recent responses passes ``maxPredictionError`` (epp's own, default 0.5) it stops publishing
  predictions, logs it, and its readers fall back as the reference's do when its sidecar is down;
  it goes on predicting the chosen pod, and publishes again once the error is back under 0.35.
  Parameters as the reference: ``streamingMode`` (false: TPOT is not part of the headroom; the
  TTFT SLO is held against the predicted end-to-end time), ``sloBufferFactor`` (the TPOT SLO is
  multiplied by it), ``contextTTL`` (a response that ends later teaches nothing),
  ``endpointRoleLabel`` (pods whose label says ``prefill`` have no TPOT), ``predictInProduce``
  (false: learn only), ``prefixMatchInfoProducerName``; ``samplingMean`` and
  ``maxDecodeTokenSamplesForPrediction`` are read and ignored, as the reference ignores them now.
- ``latency-scorer``: the reference's headroom scoring (positive headroom first, idle pods first
  when none is, deficit buckets, TTFT/TPOT blend, ``least``/``most``), with its composite fallback
  (KV, queue, prefix) when there is no prediction.
- ``slo-headroom-tier-filter``: the pods predicted to meet the SLOs, with ``epsilonExploreNeg``
  exploration of the others.
- ``prefix-cache-affinity-filter``: the pods holding at least ``affinityThreshold`` of the prompt,
  unless the best of them is predicted ``maxTTFTPenaltyMs`` slower than the best other pod.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import (
    DataProducer,
    DrawsFromRng,
    ExportsMetrics,
    Filter,
    ForgetsEndpoints,
    ObservesCompletion,
    ObservesPicks,
    ObservesPrefill,
    PrefixProducer,
    ReadsClock,
    ReadsPendingPrefill,
    Scorer,
    UsesLatencyProducer,
    UsesPrefixProducer,
)
from epp.scheduling.latency_model import (
    BATCH_UNIT,
    MIN_SECONDS,
    TOKEN_UNIT,
    ErrorTracker,
    LatencyModel,
    Vector,
    predict,
    tpot_features,
    ttft_features,
)
from epp.scheduling.params import INFLIGHT_BUILT_IN, Params
from epp.scheduling.types import MATCHED_TOKENS, Completion, ConfigError, CycleState, PrefixMatch, Slot, prompt_tokens

log = logging.getLogger("epp.latency")

TTFT_SLO_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
TPOT_SLO_HEADERS = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")
LOCALITY_MARGIN = 0.2
DEFAULT_OUTPUT_TOKENS = 256.0  # the expected output length before any response reported one
POD_MODELS = ("own", "speed")  # each pod its own coefficients; or one shared shape x each pod's speed
ENCODER_CACHE = "multimodal encoder-cache features: epp routes text"


class LatencyPrediction(NamedTuple):
    """One candidate's prediction for this request (seconds), and its headroom against the SLOs
    (``SLO - predicted``; no SLO counts as 0, so the headroom is ``-predicted``)."""

    ttft: float
    tpot: float
    ttft_headroom: float
    tpot_headroom: float
    dispatched: int  # requests epp has in flight there
    # The TTFT this request's own prefill would add to the requests arriving at the pod meanwhile
    # (epp's own: the pod's recent arrival rate x its prefill time squared / 2).
    interference: float = 0.0
    # Seconds of prefill this request's uncached part costs the pod (with a locality horizon,
    # shared among the requests expected to reuse the prefix it caches there).
    own_prefill: float = 0.0
    # The seconds of TTFT the next requests for this prompt's cached prefix would save if it were
    # cached here too (epp's own: a pod that does not hold it yet; 0 on the pods that do).
    locality: float = 0.0
    # The prompt tokens the pod computes before this request's first token (its pending prefill
    # and this request's uncached part), in thousands.
    backlog: float = 0.0
    # What the prediction was made from (the response path learns from the chosen pod's).
    ahead: int = 0  # prompt tokens epp has pending there
    batch: float = 0.0  # requests running or waiting there
    own: float = 0.0  # this request's prompt tokens not cached there

    @property
    def meets_slo(self) -> bool:
        return self.ttft_headroom >= 0 and self.tpot_headroom >= 0


@dataclass(slots=True)
class _Pick:
    """What the producer keeps about one request until it ends."""

    pod: str = ""
    ahead: float = 0.0  # pending prefill tokens on the pod before this request
    batch: float = 0.0
    uncached: float = 0.0
    ttft: float = 0.0  # predicted, on the chosen pod
    tpot: float = 0.0
    streamed: bool = False
    sent: float = 0.0
    first: float = 0.0


def slo_seconds(headers: Mapping[str, str], names: tuple[str, ...]) -> float | None:
    for h in names:
        raw = headers.get(h)
        if raw:
            try:
                v = float(raw)
            except ValueError:
                return None
            return v / 1000.0 if math.isfinite(v) and v > 0 else None
    return None


class PredictedLatencyProducer(DataProducer, ObservesPicks, ObservesPrefill, ObservesCompletion, ForgetsEndpoints,
                               ExportsMetrics, UsesPrefixProducer, ReadsClock):
    type_name: ClassVar[str] = "predicted-latency-producer"
    consumes: ClassVar[tuple[Slot[Any], ...]] = (MATCHED_TOKENS,)

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        for ignored in ("samplingMean", "maxDecodeTokenSamplesForPrediction"):
            if ignored in params.names():
                params.float(ignored, 0.0)
                log.info("%s.%s is ignored (as the reference ignores it: no mid-stream TPOT predictions)",
                         params.path, ignored)
        self.buffer = params.float("sloBufferFactor", 1.0, minimum=0.0)
        self.context_ttl = params.duration("contextTTL", 300.0)
        self.streaming = params.bool("streamingMode", False)
        self.role_label = params.text("endpointRoleLabel", "") or ""
        self.publish = params.bool("predictInProduce", True)
        self.producer_name = params.text("prefixMatchInfoProducerName") or None
        params.refuse("inFlightLoadProducerName", INFLIGHT_BUILT_IN)
        if params.bool("useEncoderCacheFeatures", False):
            raise ConfigError(f"{params.path}.useEncoderCacheFeatures", f"not supported by epp ({ENCODER_CACHE})")
        params.refuse("encoderCacheMatchInfoProducerName", ENCODER_CACHE)
        max_error = params.float("maxPredictionError", 0.5, minimum=0.01)
        pod_model = params.text("podModel", "own", choices=POD_MODELS)
        params.done()
        self.own_index = False
        self.prefix: PrefixProducer | None = None
        self.model = LatencyModel(shared=pod_model == "speed")
        self.errors = ErrorTracker(max_error=max_error, recover_error=min(0.35, max_error * 0.7))
        self.mean_output = DEFAULT_OUTPUT_TOKENS
        self.clock: Callable[[], float] = time.monotonic
        self._published: Slot[dict[str, LatencyPrediction]] = Slot(f"{name}/predictions")
        self._all: Slot[dict[str, LatencyPrediction]] = Slot(f"{name}/all")
        self._pick: Slot[_Pick] = Slot(f"{name}/pick")
        self._streams: Slot[bool] = Slot(f"{name}/streams")
        self._now: Slot[float] = Slot(f"{name}/now")
        self.arrivals = ArrivalRates()
        self.interference_wanted = False  # a reader weighs interference (set when it binds)
        self.running_slos = RunningSLOs()
        self._tpot_slo: Slot[float] = Slot(f"{name}/tpot-slo")
        self.locality_horizon = 0.0  # a reader weighs locality over this many seconds (set when it binds)
        self.prefix_rates = PrefixRates()
        self._prefix_key: Slot[int] = Slot(f"{name}/prefix-key")


    def use_clock(self, clock: Callable[[], float]) -> None:
        self.clock = clock
    def bind_producer(self, producer: PrefixProducer | None) -> None:
        self.prefix = producer

    # -- predictions ---------------------------------------------------------------------------
    def produce(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
                cycle: CycleState) -> None:
        match = self.prefix.match(request, candidates, cycle) if self.prefix is not None else None
        matched = cycle.get(MATCHED_TOKENS) or {}
        prompt = float(prompt_tokens(cycle, request.prompt))
        headers = request.headers
        ttft_slo = slo_seconds(headers, TTFT_SLO_HEADERS) or 0.0
        own_tpot_slo = slo_seconds(headers, TPOT_SLO_HEADERS) or 0.0
        tpot_slo = own_tpot_slo * self.buffer
        if own_tpot_slo:
            cycle.put(self._tpot_slo, own_tpot_slo)
        streaming = self.streaming
        tail = 0.0 if streaming else max(0.0, self._expected_output(request) - 1)  # tokens after the first
        pending, inflight, now = snapshot.inflight_tokens, snapshot.inflight, snapshot.now
        rate, wants = self.arrivals.rate, self.interference_wanted
        coefficients, ttft_factor, known = self.model.coefficients, self.model.ttft_factor, self.model.known.get
        role_label, tightest, buffer = self.role_label, self.running_slos.tightest, self.buffer
        future = self._future_requests(match, now, cycle) if self.locality_horizon and match is not None else 0.0
        # A copy of a prefix that many requests will reuse is worth its GPU time: they share it
        # (prefillWorkWeight then weighs what is left; a rarely seen prefix pays all of it).
        share = 1.0 / (1.0 + future)
        predictions: dict[str, LatencyPrediction] = {}
        factors: list[float] = []
        batches = 0.0
        new_prediction = tuple.__new__
        for c in candidates:
            a = c.address
            ahead = pending.get(a, 0)
            own = prompt - matched.get(a, 0)
            if own < 0:
                own = 0.0
            dispatched = inflight.get(a, 0)
            s = c.signals
            batch: float = dispatched
            if s is not None and s.running + s.waiting > dispatched:
                batch = s.running + s.waiting
            # predict(coefficients(a), ahead + own, batch, ahead), inlined (a call per candidate)
            t_coef, p_coef = known(a) or coefficients(a)
            bk = batch / BATCH_UNIT
            slope = t_coef[1] + t_coef[3] * bk
            ttft = t_coef[0] + (ahead + own) / TOKEN_UNIT * slope + t_coef[2] * bk
            if ttft < MIN_SECONDS:
                ttft = MIN_SECONDS
            tpot = p_coef[0] + p_coef[1] * (batch + 1) / BATCH_UNIT + p_coef[2] * ahead / TOKEN_UNIT
            if tpot < MIN_SECONDS:
                tpot = MIN_SECONDS
            per_token = slope / TOKEN_UNIT
            if future:
                factors.append(ttft_factor(a))
            if not streaming or (role_label and c.labels.get(role_label) == "prefill"):
                tpot_room = 0.0
            elif tpot_slo:
                # Nor may it break the TPOT SLO of what already runs there (the reference's
                # running-request queue): the tighter of the two counts.
                floor = tightest(a)
                tpot_room = (min(tpot_slo, floor * buffer) if floor else tpot_slo) - tpot
            else:
                tpot_room = -tpot
            # Without streaming the TTFT SLO is held against the whole response, as the reference's
            # non-streaming mode trains its TTFT model on end-to-end times.
            latency = ttft if streaming else ttft + tpot * tail
            own_s = own * per_token
            # (tuple.__new__: the named tuple's own constructor costs twice as much, per candidate)
            predictions[a] = new_prediction(LatencyPrediction, (
                ttft, tpot, ttft_slo - latency, tpot_room, dispatched,
                rate(a, now) * own_s * own_s / 2 if own_s and wants else 0.0, own_s * share, 0.0,
                (ahead + own) / 1000.0, ahead, batch, own))
            batches += batch
        if future:
            self._locality(future, matched, prompt, candidates, factors, predictions,
                           (self.model.pool_ttft.theta, self.model.pool_tpot.theta), batches / len(candidates))
        cycle.put(self._all, predictions)
        cycle.put(self._now, snapshot.now)
        body = request.body
        cycle.put(self._streams, bool(body is not None and body.get("stream") is True))
        if self.publish and self.errors.trusted:
            cycle.put(self._published, predictions)

    def _future_requests(self, match: PrefixMatch, now: float, cycle: CycleState) -> float:
        """The requests this prompt's cached prefix (the hash of its deepest block cached
        anywhere) had over the last horizon: as many are expected over the next (0 below one)."""
        if not match.blocks:
            return 0.0
        deepest = max(match.blocks.values())
        if deepest <= 0:
            return 0.0
        key = match.hashes[deepest - 1]
        cycle.put(self._prefix_key, key)
        future = self.prefix_rates.count(key, now, self.locality_horizon)
        return future if future >= 1.0 else 0.0

    @staticmethod
    def _locality(future: float, matched: Mapping[str, int], prompt: float, candidates: list[EndpointState],
                  factors: list[float], predictions: dict[str, LatencyPrediction],
                  shared: tuple[Sequence[float], Sequence[float]], batch: float) -> None:
        """Fill in each non-holder's ``locality``: the ``future`` requests for the prefix times
        the TTFT each would save on that pod rather than on the best pod holding it, both at the
        candidates' mean ``batch`` and without a queue (queues and batches move with routing; a pod's
        speed stays), counting only what is more than ``LOCALITY_MARGIN`` faster (two pods alike
        are predicted a few percent apart: that is no reason to compute the prefix twice). Pods are
        compared on the ``shared`` fit's TTFT times each one's speed ``factors``."""
        best = max(matched.values())
        rest = max(0.0, prompt - best)
        pooled = predict(shared, rest, batch, 0.0)[0]
        warm = [f * pooled for f in factors]
        held = [w for c, w in zip(candidates, warm, strict=True) if matched.get(c.address, 0) >= best]
        if not held:
            return
        bar = min(held) * (1.0 - LOCALITY_MARGIN)
        for c, w in zip(candidates, warm, strict=True):
            if w < bar and matched.get(c.address, 0) < best:
                a = c.address
                predictions[a] = predictions[a]._replace(locality=future * (bar - w))

    def predictions(self, cycle: CycleState) -> dict[str, LatencyPrediction] | None:
        """This cycle's predictions, None when there are none to act on (not trusted, or off)."""
        return cycle.get(self._published)

    def _expected_output(self, request: InferenceRequest) -> float:
        body = request.body
        if body is not None:
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
            if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
                return float(limit)
        return self.mean_output

    # -- learning ---------------------------------------------------------------------------------
    def on_pick(self, endpoint: str, cycle: CycleState) -> None:
        if self.prefix is not None:
            self.prefix.record(endpoint, cycle)
        now = cycle.get(self._now)
        if now is not None:
            self.arrivals.add(endpoint, now)
        slo = cycle.get(self._tpot_slo)
        if slo:
            self.running_slos.add(endpoint, slo)
        key = cycle.get(self._prefix_key)
        if key is not None and now is not None:
            self.prefix_rates.add(key, now, self.locality_horizon)
        chosen = (cycle.get(self._all) or {}).get(endpoint)
        if chosen is None:
            return
        cycle.put(self._pick, _Pick(endpoint, chosen.ahead, chosen.batch, chosen.own, chosen.ttft, chosen.tpot,
                                    cycle.get(self._streams) is True, self.clock()))

    def on_prefill_done(self, endpoint: str, cycle: CycleState) -> None:
        pick = cycle.get(self._pick)
        if pick is not None and not pick.first:
            pick.first = self.clock()

    def on_complete(self, endpoint: str, cycle: CycleState, completion: Completion) -> None:
        slo = cycle.pop(self._tpot_slo)
        if slo:
            self.running_slos.remove(endpoint, slo)
        pick = cycle.pop(self._pick)
        usage = completion.usage
        if pick is None or not pick.first:
            return
        now = self.clock()
        if now - pick.sent > self.context_ttl:
            return
        pod, model = pick.pod, self.model
        if usage is None:
            # A stream whose usage epp did not read (observed responses read most only to their
            # first bytes): its TTFT still teaches the TTFT fit, on epp's own count of the prompt
            # tokens the pod had to compute; the TPOT fit needs the token count.
            if completion.ok and completion.streamed and pick.streamed:
                x_ttft = ttft_features(pick.ahead + pick.uncached, pick.batch)
                self._learn_ttft(pod, x_ttft, pick.first - pick.sent)
            return
        own = pick.uncached
        if usage.cached_tokens is not None and usage.prompt_tokens:
            own = max(0.0, usage.prompt_tokens - usage.cached_tokens)  # what the pod actually computed
        x_ttft = ttft_features(pick.ahead + own, pick.batch)
        x_tpot = tpot_features(pick.batch, pick.ahead)
        n = usage.completion_tokens
        self.mean_output += (n - self.mean_output) * 0.02
        if pick.streamed and completion.streamed:
            ttft = pick.first - pick.sent
            if n > 1:
                model.observe_tpot(pod, x_tpot, (now - pick.first) / (n - 1))
        else:
            ttft = max(0.0005, (now - pick.sent) - model.predict_tpot(pod, x_tpot) * max(0, n - 1))
        self._learn_ttft(pod, x_ttft, ttft)

    def _learn_ttft(self, pod: str, x_ttft: Vector, ttft: float) -> None:
        """One observed TTFT: the closed loop's error (against what the fit predicted), then the fit."""
        message = self.errors.add(self.model.predict_ttft(pod, x_ttft), ttft)
        if message:
            log.warning("%s: %s", self.name, message)
        self.model.observe_ttft(pod, x_ttft, ttft)

    def on_endpoint_removed(self, endpoint: str) -> None:
        self.model.forget_pod(endpoint)
        self.arrivals.forget(endpoint)
        self.running_slos.forget(endpoint)

    def metric_families(self, pool: str) -> Iterator[Metric]:
        labels, values = ["name", "plugin"], [pool, self.name]
        median = self.errors.median()
        rows: list[tuple[type[Any], str, str, float | None]] = [
            (GaugeMetricFamily, "epp_latency_prediction_ttft_error_ratio",
             "Median |predicted - observed| / observed TTFT over recent responses.", median),
            (GaugeMetricFamily, "epp_latency_prediction_active",
             "1 while latency predictions are used, 0 while the scorers have fallen back.",
             1.0 if self.errors.trusted and self.publish else 0.0),
            (CounterMetricFamily, "epp_latency_prediction_samples", "Responses the latency model learned from.",
             float(self.errors.samples)),
            (CounterMetricFamily, "epp_latency_prediction_fallbacks",
             "Times the predictions stopped being used because their error was too large.",
             float(self.errors.fallbacks)),
        ]
        for family, name, help_text, value in rows:
            fam = family(name, help_text, labels=labels)
            if value is not None:
                fam.add_metric(values, value)
            yield fam
        hist = HistogramMetricFamily("epp_latency_prediction_ttft_error",
                                     "|predicted - observed| / observed TTFT of each response the model learned from.",
                                     labels=labels)
        cumulative = [(str(bound) if bound != math.inf else "+Inf", count) for bound, count in self.errors.cumulative()]
        hist.add_metric(values, cumulative, self.errors.error_sum)
        yield hist
        coef = GaugeMetricFamily("epp_latency_model_coefficient",
                                 "Each pod's learned latency coefficients (seconds per feature unit).",
                                 labels=["name", "plugin", "endpoint", "quantity", "feature"])
        for pod in self.model.known_pods():
            ttft, tpot = self.model.coefficients(pod)
            for quantity, theta, features in (("ttft", ttft, ("step", "ktokens", "batch16", "cross")),
                                              ("tpot", tpot, ("step", "batch16", "pending_ktokens"))):
                for feature, v in zip(features, theta, strict=True):
                    coef.add_metric([pool, self.name, pod, quantity, feature], v)
        yield coef
        speed = GaugeMetricFamily("epp_latency_model_speed_factor",
                                  "Each pod's latency on the same work as the pool's shared fit (1: the pool's "
                                  "typical pod; 2.5: 2.5 times slower).",
                                  labels=["name", "plugin", "endpoint", "quantity"])
        for pod, (ttft_factor, tpot_factor) in self.model.speed_factors().items():
            speed.add_metric([pool, self.name, pod, "ttft"], ttft_factor)
            speed.add_metric([pool, self.name, pod, "tpot"], tpot_factor)
        yield speed


class ArrivalRates:
    """Each pod's recent pick rate (requests/s), decaying with a ``horizon``-second time constant."""

    def __init__(self, horizon: float = 10.0) -> None:
        self.horizon = horizon
        self._state: dict[str, tuple[float, float]] = {}  # pod -> (decayed count, at)

    def add(self, pod: str, now: float) -> None:
        count, at = self._state.get(pod, (0.0, now))
        self._state[pod] = (count * math.exp(-max(0.0, now - at) / self.horizon) + 1.0, now)

    def rate(self, pod: str, now: float) -> float:
        entry = self._state.get(pod)
        if entry is None:
            return 0.0
        h = self.horizon
        return entry[0] * math.exp(-max(0.0, now - entry[1]) / h) / h

    def forget(self, pod: str) -> None:
        self._state.pop(pod, None)


class PrefixRates:
    """How many requests each cached prefix (the hash of its deepest block) had recently: a count
    decaying with the horizon as its time constant; the least recently seen are dropped past
    ``limit`` prefixes."""

    def __init__(self, limit: int = 65536) -> None:
        self.limit = limit
        self._counts: OrderedDict[int, tuple[float, float]] = OrderedDict()  # key -> (decayed count, at)

    def add(self, key: int, now: float, horizon: float) -> None:
        counts = self._counts
        counts[key] = (self.count(key, now, horizon) + 1.0, now)
        counts.move_to_end(key)
        if len(counts) > self.limit:
            counts.popitem(last=False)

    def count(self, key: int, now: float, horizon: float) -> float:
        entry = self._counts.get(key)
        if entry is None:
            return 0.0
        return entry[0] * math.exp(-max(0.0, now - entry[1]) / horizon)

    def __len__(self) -> int:
        return len(self._counts)


class RunningSLOs:
    """The TPOT SLOs of the requests in flight on each pod (seconds -> how many)."""

    def __init__(self) -> None:
        self._by_pod: dict[str, dict[float, int]] = {}

    def add(self, pod: str, slo: float) -> None:
        counts = self._by_pod.setdefault(pod, {})
        counts[slo] = counts.get(slo, 0) + 1

    def remove(self, pod: str, slo: float) -> None:
        counts = self._by_pod.get(pod)
        if counts is None or slo not in counts:
            return
        if counts[slo] > 1:
            counts[slo] -= 1
        else:
            del counts[slo]
            if not counts:
                del self._by_pod[pod]

    def tightest(self, pod: str) -> float:
        """The smallest TPOT SLO running on ``pod`` (0: none)."""
        counts = self._by_pod.get(pod)
        return min(counts) if counts else 0.0

    def forget(self, pod: str) -> None:
        self._by_pod.pop(pod, None)


class _ReadsPredictions(UsesLatencyProducer):
    latency_producer_name: str | None
    producer: PredictedLatencyProducer | None = None

    def bind_latency_producer(self, producer: Any) -> None:
        assert isinstance(producer, PredictedLatencyProducer)
        self.producer = producer

    def _predictions(self, cycle: CycleState) -> dict[str, LatencyPrediction] | None:
        return self.producer.predictions(cycle) if self.producer is not None else None


W_MAX = 100
EPS = 1e-9


class LatencyScorer(Scorer, _ReadsPredictions):
    type_name: ClassVar[str] = "latency-scorer"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.ttft_weight = params.float("ttftWeight", 0.8, minimum=0.0)
        self.tpot_weight = params.float("tpotWeight", 0.2, minimum=0.0)
        self.most = params.text("headroomSelectionStrategy", "least", choices=("least", "most")) == "most"
        self.kv_weight = params.float("compositeKVWeight", 1.0, minimum=0.0)
        self.queue_weight = params.float("compositeQueueWeight", 1.0, minimum=0.0)
        self.prefix_weight = params.float("compositePrefixWeight", 1.0, minimum=0.0)
        self.interference = params.float("interferenceWeight", 0.0, minimum=0.0)
        self.work = params.float("prefillWorkWeight", 0.0, minimum=0.0)
        self.horizon = params.optional_duration("localityHorizon") or 0.0
        self.locality_weight = params.float("localityWeight", 1.0, minimum=0.0)
        self.backlog_risk = params.float("backlogRisk", 0.0, minimum=0.0)
        self.trade_limit = params.float("tpotTradeLimit", 0.0, minimum=0.0)
        self.prefer_idle = params.bool("preferIdle", True)
        self.latency_producer_name = params.text("latencyPredictionInfoProducerName") or None
        self.prefix_producer_name = params.text("prefixMatchInfoProducerName") or None
        params.done()

    def bind_latency_producer(self, producer: Any) -> None:
        super().bind_latency_producer(producer)
        if self.interference:
            producer.interference_wanted = True  # it computes the pods' arrival rates for us
        if self.horizon:
            producer.locality_horizon = max(producer.locality_horizon, self.horizon)

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        predictions = self._predictions(cycle)
        if not predictions:
            return self._composite(request, candidates, cycle)
        get = predictions.get
        preds = [get(c.address) for c in candidates]
        scores = [0.0] * len(candidates)
        # One pass sorts the candidates by which SLOs they miss (an unpredicted one meets both).
        positive: list[int] = []
        tpot_only: list[int] = []
        ttft_only: list[int] = []
        both: list[int] = []
        idle: list[int] = []
        for i, p in enumerate(preds):
            if p is None:
                positive.append(i)
                continue
            t_neg, p_neg = p.ttft_headroom < 0, p.tpot_headroom < 0
            (both if t_neg and p_neg else ttft_only if t_neg else tpot_only if p_neg else positive).append(i)
            if p.dispatched == 0:
                idle.append(i)
        if positive:
            self._bucket(positive, preds, scores, force_least=False)
            return scores
        # Every candidate misses an SLO: idle pods first, then the least severe deficit.
        if idle and self.prefer_idle:
            self._bucket(idle, preds, scores, force_least=True)
            return scores
        self._bucket(tpot_only or ttft_only or both, preds, scores, force_least=True)
        return scores

    def _bucket(self, idx: list[int], preds: list[LatencyPrediction | None], scores: list[float],
                force_least: bool) -> None:
        total = self.ttft_weight + self.tpot_weight
        alpha, beta = (self.ttft_weight / total, self.tpot_weight / total) if total > 0 else (1.0, 0.0)
        ttft: list[float] = []
        tpot: list[float] = []
        if force_least and (self.interference or self.work or self.horizon or self.backlog_risk):
            # A deficit: the delay its prefill brings the pod's next arrivals, and the GPU time it
            # takes there (what recomputing a prompt cached elsewhere costs everyone), add to it;
            # so does a share of the TTFT per 1,000 tokens the pod computes first (a backlog
            # grows after the pick); what caching the prompt's prefix there too would save its
            # next requests comes off.
            w, k, c, r = self.interference, self.work, self.locality_weight, self.backlog_risk
            for i in idx:
                p = preds[i]
                if p is None:
                    ttft.append(0.0)
                    tpot.append(0.0)
                else:
                    ttft.append(abs(p.ttft_headroom) + w * p.interference + k * p.own_prefill - c * p.locality
                                + r * p.ttft * p.backlog)
                    tpot.append(abs(p.tpot_headroom))
        else:
            for i in idx:
                p = preds[i]
                ttft.append(abs(p.ttft_headroom) if p is not None else 0.0)
                tpot.append(abs(p.tpot_headroom) if p is not None else 0.0)
        t_lo, p_lo = min(ttft), min(tpot)
        t_range, p_range = max(ttft) - t_lo, max(tpot) - p_lo
        if force_least and self.trade_limit and beta > 0 and t_lo > EPS:
            # A better TPOT may buy at most trade_limit x the best TTFT: past that, a pod's TTFT
            # rank is its worst, however wide the candidates' spread.
            t_range = min(t_range, t_lo * self.trade_limit * alpha / beta)
        if t_range <= EPS < p_range:
            alpha, beta = 0.0, 1.0
        elif p_range <= EPS < t_range:
            alpha, beta = 1.0, 0.0
        most = self.most and not force_least
        # Each candidate's blend of its two ranks in [0, 1] (0.5 for a quantity all share), as the
        # reference's 1..101 steps, capped at 1.
        t_scale = alpha / t_range if t_range > EPS else 0.0
        t_flat = 0.0 if t_range > EPS else alpha * 0.5
        p_scale = beta / p_range if p_range > EPS else 0.0
        p_flat = 0.0 if p_range > EPS else beta * 0.5
        for k, i in enumerate(idx):
            n_ttft = (ttft[k] - t_lo) * t_scale if t_scale else t_flat
            if n_ttft > alpha:
                n_ttft = alpha
            combined = n_ttft + ((tpot[k] - p_lo) * p_scale if p_scale else p_flat)
            w = int(combined * W_MAX) + 1 if most else int((1.0 - combined) * W_MAX) + 1
            scores[i] = 1.0 if w >= W_MAX else w / W_MAX

    def _composite(self, request: InferenceRequest, candidates: list[EndpointState],
                   cycle: CycleState) -> list[float]:
        kv_w, q_w, p_w = self.kv_weight, self.queue_weight, self.prefix_weight
        total = kv_w + q_w + p_w
        if total <= 0:
            kv_w, q_w, p_w, total = 1.0, 0.0, 0.0, 1.0
        kv_w, q_w, p_w = kv_w / total, q_w / total, p_w / total
        waiting = [c.signals.waiting if c.signals is not None else 0.0 for c in candidates]
        top = max(waiting, default=0.0)
        matched = cycle.get(MATCHED_TOKENS) or {}
        prompt = max(1, prompt_tokens(cycle, request.prompt))
        out = []
        for c, q in zip(candidates, waiting, strict=True):
            rel_queue = (top - q) / top if top > 0 else 1.0
            kv_free = 1.0 - (c.signals.kv_usage if c.signals is not None else 0.0)
            prefix = min(1.0, matched.get(c.address, 0) / prompt) if matched else 0.0
            out.append(round(W_MAX * (kv_w * kv_free + q_w * rel_queue + p_w * prefix)) / W_MAX)
        return out


class SLOHeadroomTierFilter(Filter, _ReadsPredictions, DrawsFromRng):
    type_name: ClassVar[str] = "slo-headroom-tier-filter"

    def __init__(self, name: str, params: Params, rng: random.Random | None = None) -> None:
        self.name = name
        self.epsilon = params.float("epsilonExploreNeg", 0.01, minimum=0.0, maximum=1.0)
        self.latency_producer_name = params.text("latencyPredictionInfoProducerName") or None
        params.done()
        self.rng = rng or random.Random()

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]:
        predictions = self._predictions(cycle)
        if not predictions:
            return candidates
        positive: list[EndpointState] = []
        negative: list[EndpointState] = []
        for c in candidates:
            p = predictions.get(c.address)
            (positive if p is not None and p.meets_slo else negative).append(c)
        if not positive or not negative:
            return candidates
        return negative if self.rng.random() < self.epsilon else positive


class PrefixCacheAffinityFilter(Filter, ObservesPicks, ReadsPendingPrefill, UsesPrefixProducer, _ReadsPredictions,
                                DrawsFromRng):
    type_name: ClassVar[str] = "prefix-cache-affinity-filter"

    def __init__(self, name: str, params: Params, rng: random.Random | None = None) -> None:
        self.name = name
        self.threshold = params.float("affinityThreshold", 0.8, maximum=1.0)
        self.explore = params.float("explorationProbability", 0.0, minimum=0.0, maximum=1.0)
        self.max_penalty = params.float("maxTTFTPenaltyMs", 18000.0, minimum=0.0) / 1000.0
        self.source = params.text("ttftSource", "prefillThroughput", choices=("prefillThroughput", "latencyPredictor"))
        self.peak = params.float("peakPrefillThroughput", 15928.0, minimum=0.0)
        if self.source == "prefillThroughput" and self.max_penalty > 0 and self.peak <= 0:
            raise ConfigError(f"{params.path}.peakPrefillThroughput", "must be > 0 with ttftSource prefillThroughput")
        self.producer_name = params.text("prefixMatchInfoProducerName") or None
        self.latency_producer_name = params.text("latencyPredictionInfoProducerName") or None
        params.refuse("inFlightLoadProducerName", INFLIGHT_BUILT_IN)
        params.done()
        self.own_index = False
        self.prefix: PrefixProducer | None = None
        self.rng = rng or random.Random()

    @property
    def uses_latency(self) -> bool:
        return self.source == "latencyPredictor" and self.max_penalty > 0

    def bind_producer(self, producer: PrefixProducer | None) -> None:
        self.prefix = producer

    def on_pick(self, endpoint: str, cycle: CycleState) -> None:
        if self.prefix is not None:
            self.prefix.record(endpoint, cycle)

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]:
        if len(candidates) <= 1 or self.threshold <= 0 or self.prefix is None:
            return candidates
        if self.explore and self.rng.random() < self.explore:
            return candidates
        m = self.prefix.match(request, candidates, cycle)
        if not m.total:
            return candidates
        sticky: list[EndpointState] = []
        other: list[EndpointState] = []
        for c in candidates:
            (sticky if m.blocks.get(c.address, 0) / m.total >= self.threshold else other).append(c)
        if not sticky:
            return candidates
        if self.max_penalty > 0 and other:
            ttft = self._ttft(snapshot, cycle)
            if ttft is not None and min(map(ttft, sticky)) - min(map(ttft, other)) > self.max_penalty:
                return candidates
        return sticky

    def _ttft(self, snapshot: Snapshot, cycle: CycleState) -> Callable[[EndpointState], float] | None:
        if self.source == "latencyPredictor":
            predictions = self._predictions(cycle)
            if not predictions:
                return None  # no predictions: the load gate is skipped, as in the reference
            return lambda c: p.ttft if (p := predictions.get(c.address)) is not None else math.inf
        pending, peak = snapshot.inflight_tokens, self.peak
        return lambda c: pending.get(c.address, 0) / peak


LATENCY_PLUGINS: tuple[type[Any], ...] = (PredictedLatencyProducer, LatencyScorer, SLOHeadroomTierFilter,
                                          PrefixCacheAffinityFilter)
