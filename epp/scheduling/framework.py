"""The scheduler: a pure function of (request, snapshot) -> Decision.

Steps: keep endpoints with fresh metrics (all of them when none is fresh); run the profile's
filters; score each candidate with every scorer (each in [0, 1]); sum score x weight; let the
picker choose the primary and fallbacks. Plugins never do I/O. Admission (may this request be
scheduled now?) is the director's, before this. After the decision, the only state touched is
the plugins' own memory, through the hooks of ``epp.scheduling.contract``, resolved here once
per profile: ``committed`` when the caller commits to the decision, then ``prefill_done``,
``usage`` and ``endpoint_removed`` as the response and the pool tell.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import (
    DataProducer,
    Filter,
    ForgetsEndpoints,
    ObservesCompletion,
    ObservesPicks,
    ObservesPrefill,
    ObservesUsage,
    Picker,
    PrefixProducer,
    ReadsPendingPrefill,
    Scorer,
    ShapesDestination,
    WritesResponseHeaders,
    declares,
)
from epp.scheduling.types import (
    MATCHED_TOKENS,
    Completion,
    ConfigError,
    CycleState,
    Decision,
    SchedulingError,
    Slot,
    prompt_tokens,
)

PREFILLER_HEADER = "x-prefiller-host-port"  # the reference's (pkg/common/routing): the prefill pod, to the decode pod
PluginTimer = Callable[[str, str, str, float], None]  # (extension point, plugin type, plugin name, seconds)


@dataclass(slots=True)
class Profile:
    name: str
    scorers: list[tuple[Scorer, float]]
    picker: Picker
    filters: list[Filter] = field(default_factory=list)
    producers: list[DataProducer] = field(default_factory=list)
    prefix_producers: list[PrefixProducer] = field(default_factory=list)  # the ones its plugins read

    def plugins(self) -> list[Any]:
        return [*self.producers, *self.prefix_producers, *self.filters, *(s for s, _ in self.scorers), self.picker]


def producer_order(scorers: list[tuple[Scorer, float]]) -> list[tuple[Scorer, float]]:
    """Scorers ordered so that each runs after the producers of the slots it consumes (stable);
    ConfigError when they consume each other's slots in a cycle."""
    producers: dict[Slot[Any], set[int]] = {}
    for i, (s, _) in enumerate(scorers):
        for slot in s.produces:
            producers.setdefault(slot, set()).add(i)
    depth = [0] * len(scorers)
    for _ in range(len(scorers) + 1):
        changed = False
        for i, (s, _) in enumerate(scorers):
            need = max((depth[j] + 1 for slot in s.consumes for j in producers.get(slot, ()) if j != i), default=0)
            if need > depth[i]:
                depth[i], changed = need, True
        if not changed:
            return [sw for _, sw in sorted(enumerate(scorers), key=lambda p: depth[p[0]])]
    names = ", ".join(s.name for s, _ in scorers if s.consumes)
    raise ConfigError("schedulingProfiles[0].plugins", f"scorers consume each other's values in a cycle ({names})")


PLUGIN_TIMING_SAMPLE = 8  # time the plugins of one cycle in this many (keeps the distribution, not the cost)


def weighted_sum(scores: list[list[float]], weights: list[float], n: int) -> list[float]:
    """Each candidate's total, sum of weight x score over the scorers, in one pass for up to three
    weighted scorers (a pass per scorer was ~15% of a pick over 1,000 candidates)."""
    pairs = [(w, s) for w, s in zip(weights, scores, strict=True) if w]
    if not pairs:
        return [0.0] * n
    if len(pairs) == 1:
        (w0, s0), = pairs
        return [w0 * a for a in s0]
    if len(pairs) == 2:
        (w0, s0), (w1, s1) = pairs
        return [w0 * a + w1 * b for a, b in zip(s0, s1, strict=True)]
    if len(pairs) == 3:
        (w0, s0), (w1, s1), (w2, s2) = pairs
        return [w0 * a + w1 * b + w2 * c for a, b, c in zip(s0, s1, s2, strict=True)]
    totals = [0.0] * n
    for w, s in pairs:
        totals = [t + w * x for t, x in zip(totals, s, strict=True)]
    return totals


@dataclass(slots=True)
class Scheduler:
    profile: Profile
    plugin_timer: PluginTimer | None = None
    handler: Any = None  # the profile handler, when the config lists one
    # P/D (disagg-profile-handler): the prefill stage, and the decider that says when it runs.
    prefill: Scheduler | None = None
    decider: Any = None
    _cycles: int = 0
    # The hooks, resolved once from what each plugin declares.
    _on_pick: list[ObservesPicks] = field(init=False, default_factory=list)
    _on_prefill: list[ObservesPrefill] = field(init=False, default_factory=list)
    _on_usage: list[ObservesUsage] = field(init=False, default_factory=list)
    _on_complete: list[ObservesCompletion] = field(init=False, default_factory=list)
    _on_removed: list[ForgetsEndpoints] = field(init=False, default_factory=list)
    _headers: list[WritesResponseHeaders] = field(init=False, default_factory=list)
    _shape: ShapesDestination | None = field(init=False, default=None)
    wants_usage: bool = field(init=False, default=False)
    inject_usage: bool = field(init=False, default=False)
    # Some plugin learns from the responses' first bytes (the pod prefilled the prompt): the
    # front end must see them, not ask the gateway to skip the response body.
    watches_first_bytes: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.profile.scorers = producer_order(self.profile.scorers)
        plugins = self.profile.plugins()
        self._on_pick = [p for p in plugins if declares(p, ObservesPicks)]
        self._on_prefill = [p for p in plugins if declares(p, ObservesPrefill)]
        self._on_removed = [p for p in plugins if declares(p, ForgetsEndpoints)]
        self._headers = [p for p in plugins if declares(p, WritesResponseHeaders)]
        self._on_usage = [p for p in plugins if declares(p, ObservesUsage) and p.usage_wanted()]
        self._on_complete = [p for p in plugins if declares(p, ObservesCompletion)]
        # Some plugin learns from each response's usage (the precise scorer's closed loop, the
        # latency model); and may ask streams for usage when their client did not (epp strips it
        # back out).
        self.wants_usage = bool(self._on_usage or self._on_complete)
        self.inject_usage = bool(self._on_complete) or any(p.usage_injected() for p in self._on_usage)
        self.watches_first_bytes = bool(self._on_prefill) or any(declares(p, ReadsPendingPrefill) for p in plugins)
        self._shape: ShapesDestination | None = self.handler if declares(self.handler, ShapesDestination) else None
        if self.prefill is not None:
            self.wants_usage = self.wants_usage or self.prefill.wants_usage
            self.inject_usage = self.inject_usage or self.prefill.inject_usage
            self.watches_first_bytes = True  # the prefill pod is done with a request at its first bytes

    def plugins(self) -> list[Any]:
        """Every plugin of every stage (each instance once)."""
        out = self.profile.plugins()
        if self.prefill is not None:
            seen = {id(p) for p in out}
            out += [p for p in self.prefill.plugins() if id(p) not in seen]
        return out

    def schedule(self, request: InferenceRequest, snapshot: Snapshot) -> Decision:
        """The decision; with P/D, the decode stage's, carrying the prefill stage's when the
        decider asks for one (and the header that names the prefill pod to the decode pod)."""
        decision = self._schedule(request, snapshot)
        if self.prefill is None or self.decider is None or not self.decider.disaggregate(request, decision):
            return decision
        try:
            prefill = self.prefill.schedule(request, snapshot)
        except SchedulingError as e:  # no prefill pod can take it: the decode pod computes the prompt
            return dataclasses.replace(decision, note=f"{decision.note + '; ' if decision.note else ''}"
                                                      f"not disaggregated: {e.message}")
        return dataclasses.replace(decision, prefill=prefill,
                                   request_headers=(*decision.request_headers, (PREFILLER_HEADER, prefill.primary)))

    def _schedule(self, request: InferenceRequest, snapshot: Snapshot) -> Decision:
        if not snapshot.endpoints:
            raise SchedulingError(503, "no endpoints in the pool")
        candidates = list(snapshot.fresh())
        note = ""
        if not candidates:
            candidates = list(snapshot.endpoints)
            note = "no endpoint has fresh metrics"
        cycle = CycleState()
        self._cycles += 1
        timer = self.plugin_timer if self._cycles % PLUGIN_TIMING_SAMPLE == 0 else None
        for producer in self.profile.producers:
            t0 = time.perf_counter() if timer else 0.0
            producer.produce(request, snapshot, candidates, cycle)
            if timer:
                timer("DataProducer", producer.type_name, producer.name, time.perf_counter() - t0)
        for f in self.profile.filters:
            t0 = time.perf_counter() if timer else 0.0
            candidates = f.filter(request, snapshot, candidates, cycle)
            if timer:
                timer("Filter", f.type_name, f.name, time.perf_counter() - t0)
            if not candidates:
                raise SchedulingError(503, f"no endpoint passed the filter {f.name!r}")
        raw: list[list[float]] = []
        for scorer, _weight in self.profile.scorers:
            t0 = time.perf_counter() if timer else 0.0
            scores = scorer.score(request, snapshot, candidates, cycle)
            if timer:
                timer("Scorer", scorer.type_name, scorer.name, time.perf_counter() - t0)
            if len(scores) != len(candidates):
                raise ValueError(f"scorer {scorer.name!r} gave {len(scores)} scores for {len(candidates)} candidates")
            raw.append(scores)
        totals = weighted_sum(raw, [w for _s, w in self.profile.scorers], len(candidates))
        chosen = self.profile.picker.pick(candidates, totals)
        if not chosen:
            raise SchedulingError(503, "picker chose no endpoint")
        endpoints = tuple(candidates[i].address for i in chosen)
        destinations: tuple[str, ...] = ()
        request_headers: tuple[tuple[str, str], ...] = ()
        if self._shape is not None:
            destinations, request_headers = self._shape.destination(endpoints)
        return Decision(
            endpoints=endpoints,
            profile=self.profile.name,
            candidates=candidates,
            scorer_names=tuple(s.name for s, _ in self.profile.scorers),
            weights=tuple(w for _, w in self.profile.scorers),
            raw_scores=raw,
            totals=totals,
            cycle=cycle,
            note=note,
            destinations=destinations,
            request_headers=request_headers,
        )

    def prefill_by_endpoint(self, request: InferenceRequest, snapshot: Snapshot) -> tuple[int, dict[str, int]]:
        """``request``'s prompt tokens, and those cached on each endpoint holding some of it now:
        only the profile's prefix matchers run (no filter, no pick, nothing remembered)."""
        cycle = CycleState()
        candidates = list(snapshot.fresh()) or list(snapshot.endpoints)
        if candidates:
            for scorer, _ in self.profile.scorers:
                if MATCHED_TOKENS in scorer.produces:
                    scorer.score(request, snapshot, candidates, cycle)
        return prompt_tokens(cycle, request.prompt), cycle.get(MATCHED_TOKENS) or {}  # (the cycle's own dict)

    def committed(self, decision: Decision) -> None:
        """The caller sends the request to ``decision.primary``: plugins with memory learn it."""
        for p in self._on_pick:
            p.on_pick(decision.primary, decision.cycle)
        if decision.prefill is not None and self.prefill is not None:
            self.prefill.committed(decision.prefill)

    def prefill_done(self, decision: Decision) -> None:
        """The pod has computed ``decision``'s prompt (its first response bytes came back)."""
        for p in self._on_prefill:
            p.on_prefill_done(decision.primary, decision.cycle)
        if decision.prefill is not None and self.prefill is not None:
            self.prefill.prefill_done(decision.prefill)

    def usage(self, decision: Decision, cached_tokens: int) -> None:
        """The response to ``decision`` reported ``cached_tokens`` prompt tokens served from cache."""
        for p in self._on_usage:
            p.on_usage(decision.primary, decision.cycle, cached_tokens)

    def completed(self, decision: Decision, completion: Completion) -> None:
        """The response to ``decision`` ended (its usage, and whether it streamed)."""
        for p in self._on_complete:
            p.on_complete(decision.primary, decision.cycle, completion)
        if decision.prefill is not None and self.prefill is not None:
            self.prefill.completed(decision.prefill, completion)

    def response_headers(self, decision: Decision, endpoint: str) -> list[tuple[str, str]]:
        """Headers plugins set on the response of ``decision``'s request, served by ``endpoint``."""
        out: list[tuple[str, str]] = []
        for p in self._headers:
            out.extend(p.response_headers(endpoint, decision.cycle))
        return out

    def endpoint_removed(self, address: str) -> None:
        for p in self._on_removed:
            p.on_endpoint_removed(address)
        if self.prefill is not None:
            self.prefill.endpoint_removed(address)
