"""Saturation: is every endpoint of the pool past its queue or KV threshold?

As the reference's detector does, an endpoint without metrics, with a failing scrape, or whose
metrics are older than ``staleness`` counts as saturated (fail-closed).
"""

from __future__ import annotations

from dataclasses import dataclass

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot


@dataclass(frozen=True, slots=True)
class SaturationThresholds:
    queue_depth: float = 64.0
    kv_cache_util: float = 1.0
    staleness: float = 2.0  # seconds (saturationDetector.metricsStalenessThreshold)

    def endpoint_saturated(self, e: EndpointState, now: float) -> bool:
        s = e.signals
        if s is None or e.error is not None or now - e.scraped_at > self.staleness:
            return True
        return s.waiting >= self.queue_depth or s.kv_usage >= self.kv_cache_util

    def pool_saturated(self, snapshot: Snapshot) -> bool:
        """True when the pool has endpoints and every one of them is saturated."""
        now = snapshot.now
        return bool(snapshot.endpoints) and all(self.endpoint_saturated(e, now) for e in snapshot.endpoints)
