"""Admission: may this request be scheduled now?

``SheddableAdmission`` is the reference's legacy admission (flow control off): a sheddable
request (negative objective priority) is refused with 429 while the saturation detector reads the
candidates as saturated (>= 1.0; the default utilization-detector counts an endpoint with stale
metrics as saturated). Other requests are always admitted. With flow control on, the waiting room
(epp.requestcontrol.waiting) takes this place.

``Admitter`` is a plugin role: every admitter listed under ``plugins`` runs after admission (after
flow control dispatched the request) and before scheduling, on the candidates; one refusal is
enough. ``probabilistic-admitter`` (epp.requestcontrol.admitters) is the reference's.
"""

from __future__ import annotations

from typing import Protocol

from epp.datastore.store import Snapshot
from epp.flowcontrol.contract import SaturationDetector
from epp.request import InferenceRequest
from epp.requestcontrol.refused import SATURATED, Refused
from epp.scheduling.contract import Plugin


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


class Admitter(Plugin, Protocol):
    """A request-control plugin: None admits ``request`` (for scheduling on ``snapshot``'s
    endpoints); a Refused turns it away."""

    def admit(self, request: InferenceRequest, snapshot: Snapshot) -> Refused | None: ...

