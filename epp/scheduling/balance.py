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

from itertools import compress

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot


def spread_hot_prefixes(scores: list[float], snapshot: Snapshot, candidates: list[EndpointState],
                        abs_threshold: float, rel_threshold: float,
                        candidate_loads: list[float] | None = None) -> list[float]:
    """``scores`` (>= 0) with the prefix score of overloaded holders set to 0 (disabled when abs < 0).
    ``candidate_loads``: the candidates' loads when the cycle has them (the queue scorer's); else
    the pool's loads are read only when a holder is over ``abs`` (no limit is lower)."""
    if abs_threshold < 0 or len(candidates) < 2:
        return scores
    held = list(compress(range(len(scores)), scores))  # the holders (a third of a Python loop's time)
    if not held:
        return scores
    if candidate_loads is not None:
        held_loads = [candidate_loads[i] for i in held]
    else:
        held_loads = snapshot.loads_each([candidates[i] for i in held])
    if max(held_loads) <= abs_threshold:  # within any limit (loads are >= 0)
        return scores
    if candidate_loads is None:
        candidate_loads = snapshot.loads_each(candidates)
    limit = min(candidate_loads) * rel_threshold + abs_threshold
    out = list(scores)
    for i, load in zip(held, held_loads, strict=True):
        if load > limit:
            out[i] = 0.0
    return out
