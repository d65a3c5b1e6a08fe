"""The built-in plugins, each registered by its config type name (see ``PLUGIN_TYPES``)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.balance import spread_hot_prefixes, thresholds_from_params
from epp.scheduling.params import ENDPOINTS_PER_PICK_LIMIT, Params
from epp.scheduling.precise_scorer import PrecisePrefixCacheScorer
from epp.scheduling.prefill_load import MATCHED_TOKENS, PrefillLoadScorer
from epp.scheduling.prefix_index import index_from_params
from epp.scheduling.types import CycleState


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


class QueueScorer(_NoParams):
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


class KVCacheUtilizationScorer(_NoParams):
    """Free KV cache scores higher: 1 - kv_cache_usage_perc."""

    type_name: ClassVar[str] = "kv-cache-utilization-scorer"

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        return [max(0.0, 1.0 - c.signals.kv_usage) if c.signals else 0.0 for c in candidates]


class RunningRequestsScorer(_NoParams):
    """Fewer requests in flight (epp's own count plus the server's running) scores higher."""

    type_name: ClassVar[str] = "running-requests-size-scorer"

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        inflight = snapshot.inflight
        return _minmax_low_is_good([float(inflight.get(c.address, 0)) for c in candidates])


class PrefixCacheScorer:
    """Approximate prefix affinity: matched leading blocks / prompt blocks, from where epp sent
    earlier prompts, with hot prefixes spread over less busy pods (epp.scheduling.balance;
    ``balanceAbsThreshold`` < 0 turns that off). The pick records the request's blocks on the
    chosen endpoint."""

    type_name: ClassVar[str] = "prefix-cache-scorer"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.index = index_from_params(params)
        params.bool("autoTune", True)  # accepted for compatibility with the reference
        self.balance_abs, self.balance_rel = thresholds_from_params(params)
        params.done()

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        hashes = self.index.hashes(request.model, request.prompt) if request.prompt else []
        cycle.data[self.name] = hashes
        if not hashes:
            return [0.0] * len(candidates)
        matches = self.index.match_lengths(hashes)
        cycle.data[MATCHED_TOKENS] = self.index.matched_tokens(matches)
        total = len(hashes)
        scores = [matches.get(c.address, 0) / total for c in candidates]
        return spread_hot_prefixes(scores, snapshot, candidates, self.balance_abs, self.balance_rel)

    def record(self, address: str, cycle: CycleState) -> None:
        hashes = cycle.data.get(self.name)
        if hashes:
            self.index.record(address, hashes)

    def forget(self, address: str) -> None:
        self.index.forget(address)


class _Picker:
    """Pickers share ``maxNumOfEndpoints`` (primary + fallbacks) and a random source."""

    def __init__(self, name: str, params: Params, rng: random.Random | None = None) -> None:
        self.name = name
        self.max_endpoints = params.int("maxNumOfEndpoints", 1, minimum=1, maximum=ENDPOINTS_PER_PICK_LIMIT)
        params.done()
        self.rng = rng or random.Random()


class MaxScorePicker(_Picker):
    """Highest total wins; ties broken at random. ``maxNumOfEndpoints`` > 1 adds fallbacks in order."""

    type_name: ClassVar[str] = "max-score-picker"

    def pick(self, candidates: list[EndpointState], totals: list[float]) -> list[int]:
        rnd = self.rng.random
        order = sorted(range(len(candidates)), key=lambda i: (-round(totals[i], 9), rnd()))
        return order[: self.max_endpoints]


class RandomPicker(_Picker):
    """Uniformly random endpoints."""

    type_name: ClassVar[str] = "random-picker"

    def pick(self, candidates: list[EndpointState], totals: list[float]) -> list[int]:
        idx = list(range(len(candidates)))
        self.rng.shuffle(idx)
        return idx[: self.max_endpoints]


class WeightedRandomPicker(_Picker):
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


class SingleProfileHandler(_NoParams):
    """Accepted for compatibility with the reference's config files: epp runs one profile."""

    type_name: ClassVar[str] = "single-profile-handler"


PLUGIN_TYPES: Mapping[str, type[Any]] = MappingProxyType({
    cls.type_name: cls
    for cls in (QueueScorer, KVCacheUtilizationScorer, RunningRequestsScorer, PrefixCacheScorer,
                PrecisePrefixCacheScorer, PrefillLoadScorer, MaxScorePicker, RandomPicker, WeightedRandomPicker,
                SingleProfileHandler)
})
SCORERS = frozenset({"queue-scorer", "kv-cache-utilization-scorer", "running-requests-size-scorer",
                     "prefix-cache-scorer", "precise-prefix-cache-scorer", "prefill-load-scorer"})
PICKERS = frozenset({"max-score-picker", "random-picker", "weighted-random-picker"})
