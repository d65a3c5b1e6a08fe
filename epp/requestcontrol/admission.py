"""Admission without flow control: may this request be scheduled now? The director asks first.

``SheddableAdmission`` is the reference's legacy admission: a sheddable request (negative
objective priority) is refused with 429 while the saturation detector reads the candidates as
saturated (>= 1.0; the default utilization-detector counts an endpoint with stale metrics as
saturated). Other requests are always admitted. With flow control on, the waiting room
(epp.requestcontrol.waiting) takes this place.
"""

from __future__ import annotations

from typing import Protocol

from epp.datastore.store import Snapshot
from epp.flowcontrol.contract import SaturationDetector
from epp.request import InferenceRequest
from epp.requestcontrol.refused import SATURATED, Refused


class Admission(Protocol):
    """None admits ``request``; a Refused turns it away before any endpoint is chosen."""

    def admit(self, request: InferenceRequest, snapshot: Snapshot) -> Refused | None: ...


class SheddableAdmission:
    def __init__(self, detector: SaturationDetector) -> None:
        self.detector = detector

    def admit(self, request: InferenceRequest, snapshot: Snapshot) -> Refused | None:
        if request.priority >= 0:
            return None
        if self.detector.saturation(snapshot, snapshot.endpoints) >= 1.0:
            return Refused(429, "the pool is saturated and the request is sheddable; retry later", dropped=SATURATED)
        return None
