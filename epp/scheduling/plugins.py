"""The built-in plugins; ``BUILTIN`` lists them for the registry (one entry per type)."""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from typing import Any, ClassVar

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.attributes import ATTRIBUTE_PLUGINS
from epp.scheduling.balance import spread_hot_prefixes
from epp.scheduling.burst import BurstPrefixProducer
from epp.scheduling.context_length import ContextLengthAware
from epp.scheduling.contract import (
    DrawsFromRng,
    ForgetsEndpoints,
    HoldsPrefixIndex,
    ObservesPicks,
    Picker,
    PrefixProducer,
    ProfileHandler,
    ReadsPendingPrefill,
    Scorer,
    ShapesDestination,
    UsesPrefixProducer,
)
from epp.scheduling.disagg import DISAGG_PLUGINS
from epp.scheduling.filters import FILTERS
from epp.scheduling.latency import LATENCY_PLUGINS
from epp.scheduling.params import (
    BLOCKS_TO_MATCH_LIMIT,
    ENDPOINTS_PER_PICK_LIMIT,
    INFLIGHT_BUILT_IN,
    INT_LIMIT,
    Params,
)
from epp.scheduling.precise_producer import PrecisePrefixProducer
from epp.scheduling.precise_scorer import PrecisePrefixCacheScorer
from epp.scheduling.prefill_load import PrefillLoadScorer
from epp.scheduling.prefix_producer import EARLY_2026, ApproxPrefixProducer
from epp.scheduling.session_affinity import SessionAffinityScorer
from epp.scheduling.types import CANDIDATE_LOADS, MATCHED_TOKENS, ConfigError, CycleState, Slot, prompt_tokens

log = logging.getLogger("epp.plugins")
TOKEN_THRESHOLD = 4 * 1024 * 1024  # the reference's queueThresholdTokens default (128 requests of 32k)


def _minmax_low_is_good(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if hi <= lo:
        return [1.0] * len(values)
    inverse = 1.0 / (hi - lo)
    return [(hi - v) * inverse for v in values]


class _NoParams:
    """A plugin without parameters (any given are an error)."""

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()


class QueueScorer(_NoParams, Scorer):
    """Shorter queue scores higher: min-max over candidates of ``Snapshot.queued_each`` (waiting requests
    plus epp's picks the last scrape could not show), so a burst between scrapes spreads instead
    of piling onto one pod."""

    type_name: ClassVar[str] = "queue-scorer"
    produces: ClassVar[tuple[Slot[Any], ...]] = (CANDIDATE_LOADS,)

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        queued, loads = snapshot.queued_and_loads(candidates)
        cycle.put(CANDIDATE_LOADS, loads)
        return _minmax_low_is_good(queued)


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
        params.refuse("inFlightLoadProducerName", INFLIGHT_BUILT_IN)
        params.done()

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        inflight = snapshot.inflight
        counts = [inflight.get(c.address, 0) for c in candidates]
        top = max(counts, default=0)
        return [1.0 if n <= self.idle else (top - n) / top * self.max_busy for n in counts]


class TokenLoadScorer(Scorer, ReadsPendingPrefill):
    """The reference's token-load-scorer: 1 - min(1, tokens / queueThresholdTokens), where tokens
    are the prompt tokens epp has sent the pod and it has not prefilled yet, plus this request's
    own uncached part there (its prompt less the prefix a prefix scorer matched on the pod)."""

    type_name: ClassVar[str] = "token-load-scorer"
    consumes: ClassVar[tuple[Slot[Any], ...]] = (MATCHED_TOKENS,)

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        threshold = params.int("queueThresholdTokens", TOKEN_THRESHOLD, maximum=INT_LIMIT)
        self.threshold = float(threshold if threshold > 0 else TOKEN_THRESHOLD)  # <= 0: the default, as there
        params.refuse("inFlightLoadProducerName", INFLIGHT_BUILT_IN)
        params.done()

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        pending = snapshot.inflight_tokens
        matched = cycle.get(MATCHED_TOKENS) or {}
        prompt = prompt_tokens(cycle, request.prompt)
        top = self.threshold
        return [1.0 - min(top, pending.get(c.address, 0) + max(0, prompt - matched.get(c.address, 0))) / top
                for c in candidates]


class LoraAffinityScorer(_NoParams, Scorer):
    """The reference's lora-affinity-scorer, from each pod's ``vllm:lora_requests_info``: 1.0
    where the request's target model (adapter) runs, 0.8 where another adapter still fits, 0.6
    where it waits to load, else 0."""

    type_name: ClassVar[str] = "lora-affinity-scorer"

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        target = request.target_model or request.model
        out = []
        for c in candidates:
            s = c.signals
            if s is None:
                out.append(0.0)
            elif target in s.active_adapters:
                out.append(1.0)
            elif len(s.active_adapters) + len(s.waiting_adapters) < s.max_adapters:
                out.append(0.8)
            else:
                out.append(0.6 if target in s.waiting_adapters else 0.0)
        return out


class KVCacheUtilizationScorer(_NoParams, Scorer):
    """Free KV cache scores higher: 1 - kv_cache_usage_perc."""

    type_name: ClassVar[str] = "kv-cache-utilization-scorer"

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        return [(1.0 - u if (u := c.signals.kv_usage) < 1.0 else 0.0) if c.signals else 0.0 for c in candidates]


class RunningRequestsScorer(_NoParams, Scorer):
    """Fewer requests in flight (epp's own count plus the server's running) scores higher."""

    type_name: ClassVar[str] = "running-requests-size-scorer"

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        inflight = snapshot.inflight
        return _minmax_low_is_good([float(inflight.get(c.address, 0)) for c in candidates])


LEGACY_INDEX_PARAMS = ("blockSizeTokens", "maxPrefixBlocksToMatch", "lruCapacityPerServer", "autoTune")


class PrefixCacheScorer(Scorer, ObservesPicks, ForgetsEndpoints, HoldsPrefixIndex, UsesPrefixProducer):
    """Prefix affinity from an approximate prefix producer: (1 - matchLengthWeight) x matched
    blocks / prompt blocks + matchLengthWeight x min(1, matched tokens / matchLengthScaleTokens)^2
    (the reference's formula; weight 0 by default), with hot prefixes spread over less busy pods
    (epp's own, epp.scheduling.balance; ``balanceAbsThreshold`` < 0 turns it off). The producer is
    the one ``prefixMatchInfoProducerName`` names, or the config's only one, or one the loader
    makes; the early-2026 form gives the index parameters here instead (its own index). The pick
    records the request's blocks on the chosen endpoint."""

    type_name: ClassVar[str] = "prefix-cache-scorer"
    produces: ClassVar[tuple[Slot[Any], ...]] = (MATCHED_TOKENS,)
    consumes: ClassVar[tuple[Slot[Any], ...]] = (CANDIDATE_LOADS,)  # when a queue scorer runs: after it

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.producer_name = params.text("prefixMatchInfoProducerName") or None
        self.weight = params.float("matchLengthWeight", 0.0, minimum=0.0, maximum=1.0)
        self.scale = params.int("matchLengthScaleTokens", 8192, minimum=0, maximum=BLOCKS_TO_MATCH_LIMIT * 64)
        if self.weight > 0 and self.scale <= 0:
            raise ConfigError(f"{params.path}.matchLengthScaleTokens", "must be > 0 when matchLengthWeight is > 0")
        self.balance_abs = params.float("balanceAbsThreshold", 4.0)
        self.balance_rel = params.float("balanceRelThreshold", 1.5, minimum=1.0)
        legacy = [k for k in LEGACY_INDEX_PARAMS if k in params.names()]
        self.producer: PrefixProducer | None = None
        self.own_index = bool(legacy)
        if legacy:
            if self.producer_name:
                raise ConfigError(f"{params.path}.{legacy[0]}", "an index parameter of the early-2026 form: with "
                                  "prefixMatchInfoProducerName, set it on the approx-prefix-cache-producer")
            self.producer = ApproxPrefixProducer.early_2026(name, params)
        params.done()

    def bind_producer(self, producer: PrefixProducer | None) -> None:
        if not self.own_index:
            self.producer = producer  # it is one of the profile's plugins: its hooks run on their own

    def _producer(self) -> PrefixProducer:
        if self.producer is None:  # built outside the loader: the early-2026 defaults, its own
            self.producer = ApproxPrefixProducer.with_limits(self.name, EARLY_2026)
            self.own_index = True
        return self.producer

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        m = self._producer().match(request, candidates, cycle)
        total = m.total
        if not total:
            return [0.0] * len(candidates)
        blocks, w = m.blocks, self.weight
        held_of, per_block = blocks.get, 1.0 / total
        ratios = [held_of(c.address, 0) * per_block for c in candidates]
        if w:
            size, scale = m.block_tokens, self.scale
            ratios = [(1 - w) * r + w * min(1.0, blocks.get(c.address, 0) * size / scale) ** 2
                      for r, c in zip(ratios, candidates, strict=True)]
        return spread_hot_prefixes(ratios, snapshot, candidates, self.balance_abs, self.balance_rel,
                                   cycle.get(CANDIDATE_LOADS))

    def on_pick(self, endpoint: str, cycle: CycleState) -> None:
        self._producer().record(endpoint, cycle)

    def on_endpoint_removed(self, endpoint: str) -> None:
        if self.own_index and isinstance(self.producer, ApproxPrefixProducer):
            self.producer.on_endpoint_removed(endpoint)

    def prefix_index_size(self) -> int:
        if self.own_index and isinstance(self.producer, ApproxPrefixProducer):
            return self.producer.prefix_index_size()
        return 0


class NoHitLRUScorer(Scorer, ObservesPicks, UsesPrefixProducer):
    """Spreads cold prompts (no candidate has any of its prefix cached): the pods that served a
    cold request longest ago, or never, score highest (1 down to 0 by rank); a warm request scores
    0.5 everywhere, leaving locality to the prefix scorer. The reference's semantics: cold is
    judged by the prefix producer's match; only cold picks move a pod up the LRU (``lruSize``
    pods, default 1024)."""

    type_name: ClassVar[str] = "no-hit-lru-scorer"
    consumes: ClassVar[tuple[Slot[Any], ...]] = (MATCHED_TOKENS,)
    own_index: bool = False

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.producer_name = params.text("prefixMatchInfoProducerName") or None
        self.size = params.int("lruSize", 1024, minimum=1, maximum=1_000_000)
        for old in ("prefixPluginType", "prefixPluginName"):
            if params.text(old) is not None:
                log.warning("%s.%s is deprecated and has no effect (as in the reference): the prefix producer "
                            "is prefixMatchInfoProducerName's", params.path, old)
        params.done()
        self.producer: PrefixProducer | None = None
        self.lru: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._cold: Slot[bool] = Slot(f"{name}/cold")

    def bind_producer(self, producer: PrefixProducer | None) -> None:
        self.producer = producer

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        blocks = self.producer.match(request, candidates, cycle).blocks if self.producer is not None else {}
        cold = not any(blocks.get(c.address, 0) > 0 for c in candidates)
        cycle.put(self._cold, cold)
        n = len(candidates)
        if not cold:
            return [0.5] * n
        if n == 1:
            return [1.0]
        position = {a: i for i, a in enumerate(self.lru)}
        never = [i for i, c in enumerate(candidates) if c.address not in position]
        scores = [0.0] * n
        for rank, i in enumerate(never):
            scores[i] = 1.0 - rank / (n - 1)
        for i, c in enumerate(candidates):
            if c.address in position:
                scores[i] = max(0.0, 1.0 - (len(never) + position[c.address]) / (n - 1))
        return scores

    def on_pick(self, endpoint: str, cycle: CycleState) -> None:
        if cycle.get(self._cold):
            lru = self.lru
            lru[endpoint] = None
            lru.move_to_end(endpoint)
            if len(lru) > self.size:
                lru.popitem(last=False)


class _Picker(DrawsFromRng):
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
        if self.max_endpoints == 1:  # (the common case: one pass, a draw only among ties)
            if not totals:
                return []
            floor = max(totals) - 1e-9
            ties = [i for i, t in enumerate(totals) if t >= floor]
            return [ties[0] if len(ties) == 1 else self.rng.choice(ties)]
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


DATA_PARALLEL_HEADER = "x-data-parallel-host-port"  # the reference's (pkg/common/routing)


class DataParallelProfileHandler(ProfileHandler, ShapesDestination):
    """The reference's ``data-parallel-profile-handler`` (deprecated there): the endpoints are a
    pod's vLLM data-parallel ranks (``ip:rank-port``); the gateway is sent to the pod's
    ``primaryPort`` (default 8000) and the chosen rank goes in ``x-data-parallel-host-port``,
    for the pod's sidecar (or its vLLM) to hand the request to. One profile, as there."""

    type_name: ClassVar[str] = "data-parallel-profile-handler"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.port = params.int("primaryPort", 8000, minimum=1, maximum=65535)
        params.done()

    def destination(self, endpoints: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
        port = str(self.port)
        return (tuple(f"{e.rpartition(':')[0]}:{port}" for e in endpoints),
                ((DATA_PARALLEL_HEADER, endpoints[0]),))


BUILTIN: tuple[type[Any], ...] = (
    QueueScorer, LoadAwareScorer, ActiveRequestScorer, TokenLoadScorer, LoraAffinityScorer, KVCacheUtilizationScorer,
    RunningRequestsScorer, PrefixCacheScorer, NoHitLRUScorer, ContextLengthAware, SessionAffinityScorer,
    PrecisePrefixCacheScorer, PrefillLoadScorer, MaxScorePicker, RandomPicker, WeightedRandomPicker,
    SingleProfileHandler, DataParallelProfileHandler, ApproxPrefixProducer, PrecisePrefixProducer, BurstPrefixProducer,
    *FILTERS,
    *LATENCY_PLUGINS, *DISAGG_PLUGINS, *ATTRIBUTE_PLUGINS)
