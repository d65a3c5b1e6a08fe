"""Saturation: is every usable endpoint past its queue or KV threshold?"""

from __future__ import annotations

from dataclasses import dataclass

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot


@dataclass(frozen=True, slots=True)
class SaturationThresholds:
    queue_depth: float = 64.0
    kv_cache_util: float = 1.0

    def endpoint_saturated(self, e: EndpointState) -> bool:
        s = e.signals
        return s is not None and (s.waiting >= self.queue_depth or s.kv_usage >= self.kv_cache_util)

    def pool_saturated(self, snapshot: Snapshot, fresh: list[EndpointState]) -> bool:
        """True only when there are fresh endpoints and every one of them is saturated."""
        return bool(fresh) and all(self.endpoint_saturated(e) for e in fresh)
