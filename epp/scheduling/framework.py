"""The scheduler: a pure function of (snapshot, request) -> Decision.

Steps: keep endpoints with fresh metrics (all of them when none is fresh); refuse a sheddable
request (negative objective priority) with 429 when every fresh endpoint is saturated; score
each candidate with every scorer of the profile (each in [0, 1]); sum score x weight; let the
picker choose the primary and fallbacks. Plugins never do I/O. The only state touched
afterwards is the plugins' memory (prefix indexes), through ``record`` once the caller commits
to the decision, and ``observe`` when the response reports its cached tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from epp.datastore.store import Snapshot
from epp.flowcontrol.saturation import SaturationThresholds
from epp.request import InferenceRequest
from epp.scheduling.types import CycleState, Decision, Picker, SchedulingError, Scorer

PluginTimer = Callable[[str, str, float], None]


@dataclass(slots=True)
class Profile:
    name: str
    scorers: list[tuple[Scorer, float]]
    picker: Picker


PLUGIN_TIMING_SAMPLE = 8  # time the plugins of one cycle in this many (keeps the distribution, not the cost)


@dataclass(slots=True)
class Scheduler:
    profile: Profile
    saturation: SaturationThresholds = field(default_factory=SaturationThresholds)
    plugin_timer: PluginTimer | None = None
    _cycles: int = 0
    wants_usage: bool = field(init=False, default=False)
    inject_usage: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        # Scorers that read other scorers' results (the prefix matches) run after them.
        self.profile.scorers.sort(key=lambda sw: bool(getattr(sw[0], "reads_other_scores", False)))
        # Some plugin learns from each response's usage (the precise scorer's closed loop); and
        # asks streams for usage when their client did not (epp strips it back out).
        learners = [s for s, _ in self.profile.scorers if getattr(s, "wants_usage", False)]
        self.wants_usage = bool(learners)
        self.inject_usage = any(getattr(s, "inject_usage", False) for s in learners)

    def schedule(self, request: InferenceRequest, snapshot: Snapshot) -> Decision:
        if not snapshot.endpoints:
            raise SchedulingError(503, "no endpoints in the pool")
        now, staleness = snapshot.now, snapshot.staleness
        fresh = [e for e in snapshot.endpoints if e.fresh(now, staleness)]
        note = ""
        if fresh:
            if request.priority < 0 and self.saturation.pool_saturated(snapshot, fresh):
                raise SchedulingError(429, "every endpoint is saturated and the request is sheddable; retry later")
            candidates = fresh
        else:
            candidates = list(snapshot.endpoints)
            note = "no endpoint has fresh metrics"
        cycle = CycleState()
        n = len(candidates)
        totals = [0.0] * n
        raw: list[list[float]] = []
        self._cycles += 1
        timer = self.plugin_timer if self._cycles % PLUGIN_TIMING_SAMPLE == 0 else None
        for scorer, weight in self.profile.scorers:
            t0 = time.perf_counter() if timer else 0.0
            scores = scorer.score(request, snapshot, candidates, cycle)
            if timer:
                timer("scorer", scorer.name, time.perf_counter() - t0)
            raw.append(scores)
            if weight:
                for i in range(n):
                    totals[i] += weight * scores[i]
        chosen = self.profile.picker.pick(candidates, totals)
        if not chosen:
            raise SchedulingError(503, "picker chose no endpoint")
        return Decision(
            endpoints=tuple(candidates[i].address for i in chosen),
            profile=self.profile.name,
            candidates=candidates,
            scorer_names=tuple(s.name for s, _ in self.profile.scorers),
            weights=tuple(w for _, w in self.profile.scorers),
            raw_scores=raw,
            totals=totals,
            cycle=cycle,
            note=note,
        )

    def record(self, decision: Decision) -> None:
        """Commit a decision: plugins with memory (the prefix index) learn where it went."""
        for scorer, _ in self.profile.scorers:
            rec = getattr(scorer, "record", None)
            if rec is not None:
                rec(decision.primary, decision.cycle)

    def prefill_done(self, decision: Decision) -> None:
        """The pod has computed ``decision``'s prompt (its first response bytes came back)."""
        for scorer, _ in self.profile.scorers:
            done = getattr(scorer, "prefill_done", None)
            if done is not None:
                done(decision.cycle)

    def observe(self, decision: Decision, cached_tokens: int) -> None:
        """The response to ``decision`` reported ``cached_tokens`` prompt tokens served from cache."""
        for scorer, _ in self.profile.scorers:
            obs = getattr(scorer, "observe", None)
            if obs is not None:
                obs(decision.primary, decision.cycle, cached_tokens)

    def forget(self, address: str) -> None:
        for scorer, _ in self.profile.scorers:
            f = getattr(scorer, "forget", None)
            if f is not None:
                f(address)
