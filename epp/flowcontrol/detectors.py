"""Saturation detectors, the reference's two, each also a scheduling filter.

``utilization-detector`` (queueDepthThreshold 5, kvCacheUtilThreshold 0.8,
metricsStalenessThreshold 200ms, headroom 0): an endpoint's score is
max(waiting / queueDepthThreshold, kv / kvCacheUtilThreshold); the pool's saturation is the
mean over the endpoints. An endpoint with missing or stale metrics scores 1.0 (fail-closed). As
filter it keeps the endpoints under threshold * (1 + headroom) (all of them when none is).
epp counts its own picks since the endpoint's last scrape as waiting (as the queue scorer does):
the scraped queue is up to a scrape interval old, and without them a burst would all be
dispatched on one stale reading.

``concurrency-detector`` (maxConcurrency 100, maxTokenConcurrency 1,000,000, concurrencyMode
requests | tokens | hybrid, headroom 0) reads epp's own in-flight requests and prompt tokens per
endpoint: saturation is in-flight / capacity over the pool (hybrid: the mean of each endpoint's
max(requests ratio, tokens ratio)); as filter it keeps the endpoints under capacity * (1 + headroom).
epp's own ``prefillLookahead`` (a duration, default 0: off; tokens and hybrid modes, with
``prefillTokensPerSecond``) stops counting an endpoint's pending prompt tokens that long before
its backlog is predicted to be computed (``tokens_since`` + tokens / prefillTokensPerSecond), so
the next prompts reach the pod before its prefill ends instead of after its first bytes came back.
epp's own ``capPerEndpoint`` (default false: the reference's mean) counts an endpoint over its
limit as full rather than more: in the reference's form one prompt larger than
maxTokenConcurrency on each of three pods reads 1.125 over four and holds every request while the
fourth pod is empty. epp's own ``tokensMustFit`` (default false) keeps a prompt off pods where its
uncached tokens do not fit beside what is pending (unless nothing is): as filter from the config's
prefix match, and in the waiting room (``AdmitsByCost``) pod by pod from what the queued request
had cached where at arrival, so a short prompt is not computed in the same engine step as a long one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.flowcontrol.contract import AdmitsByCost, ChangesWithTime, QueuedRequest, SaturationDetector
from epp.request import InferenceRequest
from epp.scheduling.contract import PrefixProducer, UsesPrefixProducer
from epp.scheduling.params import INFLIGHT_BUILT_IN, Params
from epp.scheduling.types import ConfigError, CycleState, prompt_tokens


class UtilizationDetector(SaturationDetector):
    type_name: ClassVar[str] = "utilization-detector"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.queue_depth = params.int("queueDepthThreshold", 5, minimum=1, maximum=10**12)
        self.kv_cache_util = params.float("kvCacheUtilThreshold", 0.8, maximum=1.0)
        if self.kv_cache_util <= 0:
            raise ConfigError(f"{params.path}.kvCacheUtilThreshold",
                              f"must be in (0.0, 1.0], got {self.kv_cache_util:g}")
        self.staleness = params.duration("metricsStalenessThreshold", 0.2)
        self.headroom = params.float("headroom", 0.0, minimum=0.0)
        params.done()
        self._for: Sequence[EndpointState] | None = None
        self._pre: list[tuple[str, float, float, float, float]] = []

    def _fresh(self, e: EndpointState, now: float) -> bool:
        return e.signals is not None and e.error is None and now - e.scraped_at <= self.staleness

    def endpoint_score(self, e: EndpointState, snapshot: Snapshot) -> float:
        if not self._fresh(e, snapshot.now):
            return 1.0
        assert e.signals is not None
        return max(snapshot.queued(e) / self.queue_depth, e.signals.kv_usage / self.kv_cache_util)

    def saturation(self, snapshot: Snapshot, endpoints: Sequence[EndpointState]) -> float:
        if not endpoints:
            return 1.0
        # endpoint_score, with what comes from the scrape computed once per endpoint tuple (it is
        # replaced on every scrape): this runs once per dispatch.
        if endpoints is not self._for:
            q, kv = self.queue_depth, self.kv_cache_util
            self._pre = [(e.address, e.signals.waiting, max(e.signals.waiting / q, e.signals.kv_usage / kv),
                          e.signals.kv_usage / kv, e.scraped_at) if e.signals is not None and e.error is None
                         else (e.address, 0.0, 1.0, 1.0, -1e18) for e in endpoints]
            self._for = endpoints
        now, staleness, q = snapshot.now, self.staleness, self.queue_depth
        recent, inflight = snapshot.recent_picks, snapshot.inflight
        total = 0.0
        for a, waiting, base, kv_ratio, scraped_at in self._pre:
            if now - scraped_at > staleness:
                total += 1.0
                continue
            r = recent.get(a)
            total += max((waiting + min(r, inflight.get(a, 0))) / q, kv_ratio) if r else base
        return total / len(endpoints)

    def stale_count(self, snapshot: Snapshot, endpoints: Sequence[EndpointState]) -> int:
        return sum(1 for e in endpoints if not self._fresh(e, snapshot.now))

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]:
        q_limit = self.queue_depth * (1.0 + self.headroom)
        kv_limit = self.kv_cache_util * (1.0 + self.headroom)
        now = snapshot.now
        kept = [e for e, queued in zip(candidates, snapshot.queued_each(candidates), strict=True)
                if self._fresh(e, now) and e.signals is not None and queued < q_limit
                and e.signals.kv_usage < kv_limit]
        return kept or candidates


MODES = ("requests", "tokens", "hybrid")
# A release due within this many seconds counts as come: a timer armed for it from another clock's
# reading (the loop's monotonic time, some hours large) lands a rounding error early, and would
# otherwise find nothing released and arm again.
RELEASE_SLACK = 1e-6
# ``tokensMustFit``: the share of its pending tokens a pod holding a prompt's prefix is taken to
# have left to compute when the prompt would be computed cold elsewhere (epp counts a prompt's
# tokens pending until its first bytes, so on average half of them are done).
DETOUR_SHARE = 0.5


class ConcurrencyDetector(SaturationDetector, ChangesWithTime, UsesPrefixProducer, AdmitsByCost):
    type_name: ClassVar[str] = "concurrency-detector"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.max_concurrency = params.int("maxConcurrency", 100, minimum=1, maximum=10**12)
        self.max_tokens = params.int("maxTokenConcurrency", 1_000_000, minimum=1, maximum=10**15)
        self.mode = params.text("concurrencyMode", "requests", choices=MODES) or "requests"
        self.headroom = params.float("headroom", 0.0, minimum=0.0)
        self.lookahead = params.optional_duration("prefillLookahead") or 0.0
        self.tokens_per_second = params.float("prefillTokensPerSecond", 0.0, minimum=0.0)
        self.capped = params.bool("capPerEndpoint", False)
        self.must_fit = params.bool("tokensMustFit", False)
        self.producer_name = params.text("prefixMatchInfoProducerName") or None
        self.producer: PrefixProducer | None = None
        self.own_index = not self.must_fit  # (the loader binds a prefix producer only with tokensMustFit)
        # The filter's limits, headroom included (the filter and the waiting room's check read them).
        self.request_limit = int(self.max_concurrency * (1.0 + self.headroom))
        self.token_limit = int(self.max_tokens * (1.0 + self.headroom))
        params.refuse("inFlightLoadProducerName", INFLIGHT_BUILT_IN)
        params.done()
        if self.lookahead > 0 and self.mode == "requests":
            raise ConfigError(f"{params.path}.prefillLookahead",
                              "counts prompt tokens: needs concurrencyMode tokens or hybrid")
        if self.producer_name and not self.must_fit:
            raise ConfigError(f"{params.path}.prefixMatchInfoProducerName", "only read with tokensMustFit")
        if self.must_fit and self.mode == "requests":
            raise ConfigError(f"{params.path}.tokensMustFit",
                              "counts prompt tokens: needs concurrencyMode tokens or hybrid")
        if self.tokens_per_second and not self.lookahead:
            raise ConfigError(f"{params.path}.prefillTokensPerSecond", "only read with prefillLookahead")
        if self.lookahead > 0 and not self.tokens_per_second:
            raise ConfigError(f"{params.path}.prefillTokensPerSecond", "required with prefillLookahead (how fast "
                              "a pod computes prompt tokens, as epp counts them)")

    def _released_at(self, snapshot: Snapshot) -> dict[str, float]:
        """When each endpoint's pending tokens stop counting: ``prefillLookahead`` before its
        backlog is predicted computed (tokens a peer replica holds date from now)."""
        now, since, rate, ahead = snapshot.now, snapshot.tokens_since, self.tokens_per_second, self.lookahead
        return {a: since.get(a, now) + n / rate - ahead for a, n in snapshot.inflight_tokens.items()}

    def next_change(self, snapshot: Snapshot) -> float | None:
        """The next moment a pod's pending tokens stop counting (with ``prefillLookahead``)."""
        if not self.lookahead:
            return None
        later = [t for t in self._released_at(snapshot).values() if t > snapshot.now + RELEASE_SLACK]
        return min(later) if later else None

    def _tokens(self, snapshot: Snapshot) -> dict[str, int]:
        """Each endpoint's pending prompt tokens that count toward its limit now."""
        tokens = snapshot.inflight_tokens
        if not self.lookahead or not tokens:
            return tokens
        now = snapshot.now
        now += RELEASE_SLACK
        return {a: 0 if now >= at else tokens[a] for a, at in self._released_at(snapshot).items()}

    def saturation(self, snapshot: Snapshot, endpoints: Sequence[EndpointState]) -> float:
        if not endpoints:
            return 1.0
        inflight, tokens = snapshot.inflight, self._tokens(snapshot)
        if self.capped:
            return self._capped(inflight, tokens, endpoints)
        if self.mode == "hybrid":
            return sum(max(inflight.get(e.address, 0) / self.max_concurrency,
                           tokens.get(e.address, 0) / self.max_tokens) for e in endpoints) / len(endpoints)
        if self.mode == "tokens":
            return sum(tokens.get(e.address, 0) for e in endpoints) / (self.max_tokens * len(endpoints))
        return sum(inflight.get(e.address, 0) for e in endpoints) / (self.max_concurrency * len(endpoints))

    def _capped(self, inflight: dict[str, int], tokens: dict[str, int], endpoints: Sequence[EndpointState]) -> float:
        """``capPerEndpoint``: the mean over the endpoints of each one's ratio, at most 1 (a pod
        over its limit counts as full, so the pool reads 1.0 only when every endpoint is full)."""
        mode, max_requests, max_tokens = self.mode, self.max_concurrency, self.max_tokens
        total = 0.0
        for e in endpoints:
            a = e.address
            r = inflight.get(a, 0) / max_requests if mode != "tokens" else 0.0
            t = tokens.get(a, 0) / max_tokens if mode != "requests" else 0.0
            v = r if r > t else t
            total += v if v < 1.0 else 1.0
        return total / len(endpoints)

    def stale_count(self, snapshot: Snapshot, endpoints: Sequence[EndpointState]) -> int:
        return 0  # it reads epp's own counts, never stale

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]:
        req_limit, tok_limit = self.request_limit, self.token_limit
        inflight, tokens = snapshot.inflight, self._tokens(snapshot)
        mode = self.mode
        kept = []
        for e in candidates:
            r, t = inflight.get(e.address, 0), tokens.get(e.address, 0)
            if ((mode == "requests" and r < req_limit) or (mode == "tokens" and t < tok_limit)
                    or (mode == "hybrid" and r < req_limit and t < tok_limit)):
                kept.append(e)
        if self.must_fit and kept and self.producer is not None:
            # Where this prompt's uncached tokens fit beside what is pending (or nothing is), so a
            # short prompt and a long one are not computed in one step; else (the estimate it was
            # held on was for another pod) where the least is pending.
            m = self.producer.match(request, candidates, cycle)
            matched, size = m.blocks, m.block_tokens
            prompt = prompt_tokens(cycle, request.prompt)
            cached = {a: n * size for a, n in matched.items()}
            bar = self._detour_bar(prompt, cached, tokens)
            fits = [e for e in kept
                    if self._room(tokens.get(e.address, 0), own := max(0, prompt - cached.get(e.address, 0)))
                    and own <= bar]
            if fits:
                return fits
            least = min(tokens.get(e.address, 0) for e in kept)
            return [e for e in kept if tokens.get(e.address, 0) == least]
        return kept

    def bind_producer(self, producer: PrefixProducer | None) -> None:
        self.producer = producer

    def gates(self) -> bool:
        return self.must_fit

    def fits(self, item: QueuedRequest, snapshot: Snapshot, endpoints: Sequence[EndpointState]) -> bool:
        """Some endpoint under its limits has nothing pending, or room for what ``item`` would
        compute there (its prompt less what is cached there; ``cost`` without that), as the filter
        judges it: a request held on one pod's estimate is not sent to another where it is cold."""
        req_limit, tok_limit = self.request_limit, self.token_limit
        inflight, tokens = snapshot.inflight, self._tokens(snapshot)
        matched, prompt = item.matched, item.prompt_tokens
        bar = self._detour_bar(prompt, matched, tokens) if matched else math.inf
        for e in endpoints:
            a = e.address
            t = tokens.get(a, 0)
            if inflight.get(a, 0) >= req_limit or t >= tok_limit:
                continue
            own = item.cost if matched is None else max(0, prompt - matched.get(a, 0))
            if self._room(t, own) and own <= bar:
                return True
        return False

    @staticmethod
    def _detour_bar(prompt: int, cached: Mapping[str, int], tokens: Mapping[str, int]) -> float:
        """``tokensMustFit``: the most a prompt may compute on a pod: what it computes where the
        most of it is cached, plus half what that pod has pending (about what it has left to do,
        on average). Sent further, it would compute more than it saves waiting there, and the
        pool's prefill is what is short."""
        if not cached:
            return math.inf
        most = max(cached.values())
        if most <= 0:
            return math.inf
        pending = min(tokens.get(a, 0) for a, n in cached.items() if n == most)
        return max(0, prompt - most) + DETOUR_SHARE * pending

    def _room(self, pending: int, own: int) -> bool:
        """``tokensMustFit``: ``own`` uncached tokens may join ``pending`` ones on a pod."""
        return not pending or pending + own <= self.token_limit


DETECTORS: tuple[type[Any], ...] = (UtilizationDetector, ConcurrencyDetector)
