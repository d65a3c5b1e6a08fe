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

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot


def loads(snapshot: Snapshot, candidates: list[EndpointState]) -> list[float]:
    inflight = snapshot.inflight
    out = []
    for c in candidates:
        s = c.signals
        served = (s.running + s.waiting) if s is not None else 0.0
        out.append(max(float(inflight.get(c.address, 0)), served))
    return out


def spread_hot_prefixes(scores: list[float], snapshot: Snapshot, candidates: list[EndpointState],
                        abs_threshold: float, rel_threshold: float) -> list[float]:
    """``scores`` with the prefix score of overloaded holders set to 0 (disabled when abs < 0)."""
    if abs_threshold < 0 or len(candidates) < 2 or not any(scores):
        return scores
    load = loads(snapshot, candidates)
    limit = min(load) * rel_threshold + abs_threshold
    return [0.0 if s > 0 and load[i] > limit else s for i, s in enumerate(scores)]
