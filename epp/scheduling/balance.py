"""Hot-prefix spreading: a prefix match does not count on a pod much busier than the least busy.

Prefix affinity alone sends every request of a popular prefix to the one pod that holds it;
past some load that pod's batch slows every request on it (longer steps, then queueing) more
than recomputing the prefix elsewhere costs. So when a holder's load exceeds
``min_load x rel + abs`` (load = max(epp's in-flight requests there, the pod's running +
waiting)), its prefix score is dropped for this request: the request goes to a less busy pod,
which then holds the prefix too, and the prefix spreads over as many pods as its traffic
needs. (sglang-router and vllm-router apply a similar balance threshold in cache_aware.)
"""

from __future__ import annotations

import math

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot


def loads(snapshot: Snapshot, candidates: list[EndpointState]) -> list[float]:
    inflight_of = snapshot.inflight.get
    out: list[float] = []
    append = out.append
    for c in candidates:  # (no builtin call per candidate: max() and float() were half of this at 1,000)
        s = c.signals
        served = (s.running + s.waiting) if s is not None else 0.0
        inflight = inflight_of(c.address, 0)
        append(inflight if inflight > served else served)
    return out


def spread_hot_prefixes(scores: list[float], snapshot: Snapshot, candidates: list[EndpointState],
                        abs_threshold: float, rel_threshold: float,
                        candidate_loads: list[float] | None = None) -> list[float]:
    """``scores`` with the prefix score of overloaded holders set to 0 (disabled when abs < 0).
    ``candidate_loads``: the candidates' loads when the cycle has them (the queue scorer's).

    Else the pool's least load is read only as far as it decides something: not at all when no
    holder is over ``abs`` (no limit is lower), and until a load low enough to drop every holder
    over it turns up (an idle pod, in a large pool: the first few candidates rather than all)."""
    if abs_threshold < 0 or len(candidates) < 2:
        return scores
    held = [i for i, s in enumerate(scores) if s > 0]
    if not held:
        return scores
    if candidate_loads is not None:
        held_loads = [candidate_loads[i] for i in held]
    else:
        held_loads = loads(snapshot, [candidates[i] for i in held])
    over = [load for load in held_loads if load > abs_threshold]
    if not over:  # within any limit (loads are >= 0)
        return scores
    least = min(candidate_loads) if candidate_loads is not None else \
        _least_load(snapshot, candidates, rel_threshold, abs_threshold, min(over))
    limit = least * rel_threshold + abs_threshold
    out = list(scores)
    for i, load in zip(held, held_loads, strict=True):
        if load > limit:
            out[i] = 0.0
    return out


def _least_load(snapshot: Snapshot, candidates: list[EndpointState], rel: float, abs_: float,
                lowest_over: float) -> float:
    """The candidates' least load, or the first load low enough that its limit (load x rel + abs) is
    under ``lowest_over``: every holder over ``abs`` is over the limit then, as over the true one."""
    inflight_of = snapshot.inflight.get
    least = math.inf
    for c in candidates:
        s = c.signals
        served = (s.running + s.waiting) if s is not None else 0.0
        inflight = inflight_of(c.address, 0)
        load = inflight if inflight > served else served
        if load < least:
            least = load
            if least * rel + abs_ < lowest_over:
                break
    return least
