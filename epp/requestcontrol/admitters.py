"""Admitter plugins (epp.requestcontrol.admission.Admitter).

``probabilistic-admitter`` (the reference's): requests of priority >= 0 always pass; a sheddable
one is refused with probability min(saturation^power * k, 1), where saturation is the mean over
the candidates of max(waiting / queueDepthThreshold, KV use / kvCacheUtilThreshold) (a pod
without metrics counts 1.0; no candidates: admitted). Defaults: queueDepthThreshold 5,
kvCacheUtilThreshold 0.8, power 5, k 300 (everything shed from saturation ~0.34). The reference
answers such a refusal as an internal error; epp answers 429 with ``rejected-saturated``.

``latency-slo-admitter`` (the reference's): a sheddable request that carries an SLO header
(``x-llm-d-slo-ttft-ms`` / ``x-llm-d-slo-tpot-ms``) is refused (429) when no candidate is
predicted to meet its SLOs, none is idle (no running request) and none is cold (KV use under
2%, where predictions are least reliable). Without predictions (none trusted yet) it admits.
It reads the latency producer the loader binds (``latencyPredictionInfoProducerName``).
"""

from __future__ import annotations

import random
from typing import ClassVar

from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.requestcontrol.admission import Admitter
from epp.requestcontrol.refused import SATURATED, Refused
from epp.scheduling.contract import DrawsFromRng, UsesLatencyProducer
from epp.scheduling.latency import TPOT_SLO_HEADERS, TTFT_SLO_HEADERS, PredictedLatencyProducer, slo_seconds
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError, CycleState


class ProbabilisticAdmitter(Admitter, DrawsFromRng):
    type_name: ClassVar[str] = "probabilistic-admitter"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.queue_depth = params.int("queueDepthThreshold", 5, minimum=1, maximum=10**12)
        self.kv_cache_util = params.float("kvCacheUtilThreshold", 0.8)
        self.power = params.float("power", 5.0)
        self.k = params.float("k", 300.0)
        params.done()
        for key, value in (("kvCacheUtilThreshold", self.kv_cache_util), ("power", self.power), ("k", self.k)):
            if value <= 0:
                raise ConfigError(f"{params.path}.{key}", f"must be > 0, got {value:g}")
        self.rng = random.Random()

    def saturation(self, snapshot: Snapshot) -> float:
        total = 0.0
        for e in snapshot.endpoints:
            s = e.signals
            total += 1.0 if s is None else max(s.waiting / self.queue_depth, s.kv_usage / self.kv_cache_util)
        return total / len(snapshot.endpoints)

    def admit(self, request: InferenceRequest, snapshot: Snapshot) -> Refused | None:
        if request.priority >= 0 or not snapshot.endpoints:
            return None
        saturation = self.saturation(snapshot)
        p = min(saturation**self.power * self.k, 1.0)
        if self.rng.random() < p:
            return Refused(429, f"probabilistic-admitter: shed at saturation {saturation:.3f} "
                                f"(probability {p:.2f}); retry later", dropped=SATURATED)
        return None


COLD_KV = 0.02  # the reference's: below this KV use a pod's predictions are not to be trusted


class LatencySLOAdmitter(Admitter, UsesLatencyProducer):
    type_name: ClassVar[str] = "latency-slo-admitter"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.latency_producer_name = params.text("latencyPredictionInfoProducerName") or None
        params.done()
        self.producer: PredictedLatencyProducer | None = None

    def bind_latency_producer(self, producer: object) -> None:
        assert isinstance(producer, PredictedLatencyProducer)
        self.producer = producer

    def admit(self, request: InferenceRequest, snapshot: Snapshot) -> Refused | None:
        producer = self.producer
        if request.priority >= 0 or producer is None or not snapshot.endpoints:
            return None
        headers = request.headers
        if slo_seconds(headers, TTFT_SLO_HEADERS) is None and slo_seconds(headers, TPOT_SLO_HEADERS) is None:
            return None
        candidates = list(snapshot.fresh()) or list(snapshot.endpoints)
        cycle = CycleState()
        producer.produce(request, snapshot, candidates, cycle)
        predictions = producer.predictions(cycle)
        if not predictions:
            return None  # fail open, as the reference does
        if any(p.meets_slo for p in predictions.values()):
            return None
        for c in candidates:
            s = c.signals
            if s is not None and (s.running == 0 or s.kv_usage < COLD_KV):
                return None
        return Refused(429, "latency-slo-admitter: no endpoint is predicted to meet the request's SLOs; "
                            "retry later", dropped=SATURATED)


ADMITTERS = (ProbabilisticAdmitter, LatencySLOAdmitter)
