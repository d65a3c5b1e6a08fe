"""Admission: may this request be scheduled now? The director asks before scheduling.

``Admission`` is the extension point flow control takes over (queue, then dispatch); today's
policy is ``SheddableAdmission``: a sheddable request (negative objective priority) is refused
with 429 while every endpoint is saturated (epp.flowcontrol.saturation; an endpoint with stale
metrics counts as saturated, as in the reference). Other requests are always admitted.
"""

from __future__ import annotations

from typing import Protocol

from epp.datastore.store import Snapshot
from epp.flowcontrol.saturation import SaturationThresholds
from epp.request import InferenceRequest
from epp.requestcontrol.refused import SATURATED, Refused


class Admission(Protocol):
    """None admits ``request``; a Refused turns it away before any endpoint is chosen."""

    def admit(self, request: InferenceRequest, snapshot: Snapshot) -> Refused | None: ...


class SheddableAdmission:
    def __init__(self, thresholds: SaturationThresholds | None = None) -> None:
        self.thresholds = thresholds or SaturationThresholds()

    def admit(self, request: InferenceRequest, snapshot: Snapshot) -> Refused | None:
        if request.priority >= 0:
            return None
        if self.thresholds.pool_saturated(snapshot):
            return Refused(429, "every endpoint is saturated and the request is sheddable; retry later",
                           dropped=SATURATED)
        return None
