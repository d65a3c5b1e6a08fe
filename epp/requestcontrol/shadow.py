"""Shadow evaluation: candidate configs schedule every sampled live request too, without acting.

For a sampled request each candidate's scheduler decides on the same snapshot as the live one;
then it learns where the request really went (its memory, e.g. its prefix index, is told the live
pod), so its next decisions start from the pool as it is. Per candidate the tallies are: decisions,
agreements with the live pick, the prompt tokens predicted cached on its choice and on the live
pod (by the live profile's prefix match, which follows the real placements; the candidate's own
when the live profile has none), and, from the response, the tokens the live pod reported cached.
"Estimated cached" = reported + (predicted at its choice - predicted at the live pod): what the
pods would have served from cache had the candidate routed. Candidate configs hold
scheduling only (plugins and schedulingProfiles; epp.config.load_shadow_config refuses the rest).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.framework import Scheduler
from epp.scheduling.types import MATCHED_TOKENS, Decision, SchedulingError

log = logging.getLogger("epp.shadow")


@dataclass(slots=True)
class Tally:
    decisions: int = 0
    agreed: int = 0
    failed: int = 0
    predicted_own: int = 0  # prompt tokens it predicted cached on its own choice
    predicted_live: int = 0  # ...and on the live pod
    reported: int = 0  # prompt tokens the live pod reported cached (sampled requests with usage)
    prompt: int = 0  # prompt tokens of those requests
    queue_own: float = 0.0  # requests waiting or in flight (epp's) on its choice, summed over its decisions
    queue_live: float = 0.0  # ...and on the live pod

    @property
    def estimated(self) -> int:
        return self.reported + self.predicted_own - self.predicted_live


@dataclass(slots=True)
class Candidate:
    name: str
    scheduler: Scheduler
    tally: Tally = field(default_factory=Tally)


@dataclass(slots=True)
class ShadowPick:
    """One candidate's decision for one live request, committed at the live pod."""

    candidate: Candidate
    decision: Decision  # its cycle, with the live pod as primary (what its plugins learned)
    chose: str  # where it would have sent the request
    predicted_own: int  # prompt tokens it predicted cached on its own choice
    predicted_live: int  # ...and on the live pod


def _queue(snapshot: Snapshot, address: str) -> float:
    """Requests waiting at the pod (its metrics) plus epp's own in flight there."""
    state = next((e for e in snapshot.endpoints if e.address == address), None)
    waiting = state.signals.waiting if state is not None and state.signals is not None else 0.0
    return waiting + snapshot.inflight.get(address, 0)


class ShadowEvaluation(Collector):
    """The candidates, the sampling, and the tallies (a loop collector for /metrics)."""

    def __init__(self, candidates: list[tuple[str, Scheduler]], sample_rate: float = 1.0,
                 rng: random.Random | None = None) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"--shadow-sample-rate: expected a fraction in (0, 1], got {sample_rate}")
        names = [n for n, _ in candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"two shadow configs have the same name (file stem): {names}")
        self.candidates = [Candidate(n, s) for n, s in candidates]
        self.sample_rate = sample_rate
        self.rng = rng or random.Random()

    def observe(self, request: InferenceRequest, snapshot: Snapshot, live: Decision) -> list[ShadowPick]:
        """Each candidate's decision for ``request`` (when sampled), committed at the live pod."""
        if self.sample_rate < 1 and self.rng.random() >= self.sample_rate:
            return []
        out = []
        live_matched = live.cycle.get(MATCHED_TOKENS)
        for c in self.candidates:
            t = c.tally
            try:
                d = c.scheduler.schedule(request, snapshot)
            except SchedulingError:
                t.failed += 1
                continue
            except Exception:  # a candidate's bug must not touch the live request
                log.exception("shadow config %s failed on request %s", c.name, request.request_id or "-")
                t.failed += 1
                continue
            t.decisions += 1
            t.agreed += d.primary == live.primary
            t.queue_own += _queue(snapshot, d.primary)
            t.queue_live += _queue(snapshot, live.primary)
            # What each pod holds of this prompt: the live profile's prefix match (it learns the real
            # placements), else the candidate's own.
            matched = live_matched or d.cycle.get(MATCHED_TOKENS) or {}
            at_live = dataclasses.replace(d, endpoints=(live.primary,), prefill=None)
            c.scheduler.committed(at_live)
            out.append(ShadowPick(c, at_live, d.primary, matched.get(d.primary, 0), matched.get(live.primary, 0)))
        return out

    @staticmethod
    def reported(picks: list[ShadowPick], prompt_tokens: int, cached_tokens: int) -> None:
        """The live response's usage, for the sampled request's candidates (the predictions count
        from here, so every sum covers the same requests)."""
        for p in picks:
            t = p.candidate.tally
            t.reported += cached_tokens
            t.prompt += prompt_tokens
            t.predicted_own += p.predicted_own
            t.predicted_live += p.predicted_live

    def endpoint_removed(self, address: str) -> None:
        for c in self.candidates:
            c.scheduler.endpoint_removed(address)

    def collect(self) -> Iterator[Metric]:
        rows = (("epp_shadow_decisions", "Sampled live requests each shadow config scheduled.", "decisions"),
                ("epp_shadow_agreements", "Of those, the ones where it chose the live pod.", "agreed"),
                ("epp_shadow_failures", "Sampled requests a shadow config could not schedule.", "failed"),
                ("epp_shadow_predicted_cached_tokens", "Prompt tokens it predicted cached on its own choice.",
                 "predicted_own"),
                ("epp_shadow_reported_cached_tokens", "Prompt tokens the live pods reported cached (sampled).",
                 "reported"),
                ("epp_shadow_estimated_cached_tokens", "Prompt tokens estimated cached had it routed.", "estimated"),
                ("epp_shadow_prompt_tokens", "Prompt tokens of the sampled requests with usage.", "prompt"))
        for name, doc, attr in rows:
            family = CounterMetricFamily(name, doc, labels=["config"])
            for c in self.candidates:
                family.add_metric([c.name], float(getattr(c.tally, attr)))
            yield family

    def view(self) -> list[dict[str, object]]:
        """The dashboard's panel."""
        out: list[dict[str, object]] = []
        for c in self.candidates:
            t = c.tally
            out.append({"config": c.name, "decisions": t.decisions, "failed": t.failed,
                        "agreement": t.agreed / t.decisions if t.decisions else None,
                        "queue": t.queue_own / t.decisions if t.decisions else None,
                        "live_queue": t.queue_live / t.decisions if t.decisions else None,
                        "live_hit_rate": t.reported / t.prompt if t.prompt else None,
                        "estimated_hit_rate": max(0, t.estimated) / t.prompt if t.prompt else None})
        return out
