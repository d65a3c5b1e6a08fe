"""The built-in plugins; ``BUILTIN`` lists them for the registry (one entry per type)."""

from __future__ import annotations

import logging
import random
from typing import Any, ClassVar

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import ForgetsEndpoints, HoldsPrefixIndex, ObservesPicks, Picker, ProfileHandler, Scorer
from epp.scheduling.filters import FILTERS
from epp.scheduling.params import ENDPOINTS_PER_PICK_LIMIT, INT_LIMIT, Params
from epp.scheduling.precise_scorer import PrecisePrefixCacheScorer
from epp.scheduling.prefill_load import PrefillLoadScorer
from epp.scheduling.prefix_index import ApproximatePrefix
from epp.scheduling.types import MATCHED_TOKENS, ConfigError, CycleState, Slot

log = logging.getLogger("epp.plugins")


def _minmax_low_is_good(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if hi <= lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


class _NoParams:
    """A plugin without parameters (any given are an error)."""

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()


class QueueScorer(_NoParams, Scorer):
    """Shorter queue scores higher: min-max over candidates of waiting requests plus the picks epp
    made since the last scrape that are still in flight (the scrape could not see them), so a
    burst between scrapes spreads instead of piling onto one pod."""

    type_name: ClassVar[str] = "queue-scorer"

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        recent, inflight = snapshot.recent_picks, snapshot.inflight
        return _minmax_low_is_good([
            (c.signals.waiting if c.signals else 0.0) + min(recent.get(c.address, 0), inflight.get(c.address, 0))
            for c in candidates
        ])


class LoadAwareScorer(Scorer):
    """The reference's ``load-aware-scorer``: 0.5 for an empty queue, else 0.5 x (1 - waiting /
    ``threshold``), waiting capped at the threshold (default 128; a value <= 0 means the default,
    as in the reference)."""

    type_name: ClassVar[str] = "load-aware-scorer"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        threshold = params.int("threshold", 128, minimum=-INT_LIMIT)
        self.threshold = float(threshold if threshold > 0 else 128)
        params.done()

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        th = self.threshold
        out = []
        for c in candidates:
            waiting = c.signals.waiting if c.signals else 0.0
            out.append(0.5 if waiting <= 0 else 0.5 * (1.0 - min(waiting, th) / th))
        return out


class ActiveRequestScorer(Scorer):
    """The reference's ``active-request-scorer``: a pod with at most ``idleThreshold`` requests in
    flight (epp's own count) scores 1; the others ``(max - count) / max x maxBusyScore``."""

    type_name: ClassVar[str] = "active-request-scorer"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        if params.text("requestTimeout") is not None:  # as the reference: deprecated, and ignored
            log.warning("%s: requestTimeout is deprecated and ignored (epp ends a request's count at its end)", name)
        self.idle = max(0, params.int("idleThreshold", 0, minimum=-INT_LIMIT))
        self.max_busy = params.float("maxBusyScore", 1.0, minimum=0.0, maximum=1.0)
        if params.text("inFlightLoadProducerName"):
            raise ConfigError(f"{params.path}.inFlightLoadProducerName",
                              "not supported by epp (it counts the requests in flight itself)")
        params.done()

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        inflight = snapshot.inflight
        counts = [inflight.get(c.address, 0) for c in candidates]
        top = max(counts, default=0)
        return [1.0 if n <= self.idle else (top - n) / top * self.max_busy for n in counts]


class KVCacheUtilizationScorer(_NoParams, Scorer):
    """Free KV cache scores higher: 1 - kv_cache_usage_perc."""

    type_name: ClassVar[str] = "kv-cache-utilization-scorer"

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        return [max(0.0, 1.0 - c.signals.kv_usage) if c.signals else 0.0 for c in candidates]


class RunningRequestsScorer(_NoParams, Scorer):
    """Fewer requests in flight (epp's own count plus the server's running) scores higher."""

    type_name: ClassVar[str] = "running-requests-size-scorer"

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        inflight = snapshot.inflight
        return _minmax_low_is_good([float(inflight.get(c.address, 0)) for c in candidates])


class PrefixCacheScorer(Scorer, ObservesPicks, ForgetsEndpoints, HoldsPrefixIndex):
    """Approximate prefix affinity: matched leading blocks / prompt blocks, from where epp sent
    earlier prompts, with hot prefixes spread over less busy pods (epp.scheduling.balance;
    ``balanceAbsThreshold`` < 0 turns that off). The pick records the request's blocks on the
    chosen endpoint."""

    type_name: ClassVar[str] = "prefix-cache-scorer"
    produces: ClassVar[tuple[Slot[Any], ...]] = (MATCHED_TOKENS,)

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.approx = ApproximatePrefix.from_params(params)
        params.bool("autoTune", True)  # accepted for compatibility with the reference
        params.done()
        self._hashes: Slot[list[int]] = Slot(f"{name}/hashes")

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        hashes = self.approx.hashes(request)
        cycle.put(self._hashes, hashes)
        return self.approx.score(hashes, snapshot, candidates, cycle)

    def on_pick(self, endpoint: str, cycle: CycleState) -> None:
        hashes = cycle.get(self._hashes)
        if hashes:
            self.approx.index.record(endpoint, hashes)

    def on_endpoint_removed(self, endpoint: str) -> None:
        self.approx.index.forget(endpoint)

    def prefix_index_size(self) -> int:
        return self.approx.index.size()


class _Picker:
    """Pickers share ``maxNumOfEndpoints`` (primary + fallbacks) and a random source."""

    def __init__(self, name: str, params: Params, rng: random.Random | None = None) -> None:
        self.name = name
        self.max_endpoints = params.int("maxNumOfEndpoints", 1, minimum=1, maximum=ENDPOINTS_PER_PICK_LIMIT)
        params.done()
        self.rng = rng or random.Random()


class MaxScorePicker(_Picker, Picker):
    """Highest total wins; ties broken at random. ``maxNumOfEndpoints`` > 1 adds fallbacks in order."""

    type_name: ClassVar[str] = "max-score-picker"

    def pick(self, candidates: list[EndpointState], totals: list[float]) -> list[int]:
        rnd = self.rng.random
        order = sorted(range(len(candidates)), key=lambda i: (-round(totals[i], 9), rnd()))
        return order[: self.max_endpoints]


class RandomPicker(_Picker, Picker):
    """Uniformly random endpoints."""

    type_name: ClassVar[str] = "random-picker"

    def pick(self, candidates: list[EndpointState], totals: list[float]) -> list[int]:
        idx = list(range(len(candidates)))
        self.rng.shuffle(idx)
        return idx[: self.max_endpoints]


class WeightedRandomPicker(_Picker, Picker):
    """Random in proportion to score (A-Res weighted sampling without replacement)."""

    type_name: ClassVar[str] = "weighted-random-picker"

    def pick(self, candidates: list[EndpointState], totals: list[float]) -> list[int]:
        rnd = self.rng.random
        keys = []
        for i, w in enumerate(totals):
            w = max(w, 1e-9)
            keys.append((rnd() ** (1.0 / w), i))
        keys.sort(reverse=True)
        return [i for _, i in keys[: self.max_endpoints]]


class SingleProfileHandler(_NoParams, ProfileHandler):
    """Accepted for compatibility with the reference's config files: epp runs one profile."""

    type_name: ClassVar[str] = "single-profile-handler"


BUILTIN: tuple[type[Any], ...] = (
    QueueScorer, LoadAwareScorer, ActiveRequestScorer, KVCacheUtilizationScorer, RunningRequestsScorer,
    PrefixCacheScorer, PrecisePrefixCacheScorer, PrefillLoadScorer, MaxScorePicker, RandomPicker,
    WeightedRandomPicker, SingleProfileHandler, *FILTERS)
