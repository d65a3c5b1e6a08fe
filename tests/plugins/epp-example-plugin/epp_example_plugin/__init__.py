"""Two epp plugins written outside epp, loaded by type name from an EndpointPickerConfig.

- ``preferred-port-scorer`` (a Scorer that also learns from picks): 1.0 for endpoints on
  ``port``, else 0; with ``stickyAfterPick`` it also prefers the endpoint it last picked.
- ``port-range-filter`` (a Filter): keeps endpoints whose port is in [``min``, ``max``].
"""

from __future__ import annotations

from typing import ClassVar

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import Filter, ObservesPicks, Scorer
from epp.scheduling.params import Params
from epp.scheduling.types import CycleState


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


class PreferredPortScorer(Scorer, ObservesPicks):
    type_name: ClassVar[str] = "preferred-port-scorer"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.port = params.int("port", 8000, minimum=1, maximum=65535)
        self.sticky = params.bool("stickyAfterPick", False)
        params.done()  # any other parameter is a config error with its field path
        self.last: str | None = None

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        return [1.0 if _port(c.address) == self.port or (self.sticky and c.address == self.last) else 0.0
                for c in candidates]

    def on_pick(self, endpoint: str, cycle: CycleState) -> None:
        self.last = endpoint


class PortRangeFilter(Filter):
    type_name: ClassVar[str] = "port-range-filter"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.low = params.int("min", 1, minimum=1, maximum=65535)
        self.high = params.int("max", 65535, minimum=1, maximum=65535)
        params.done()

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]:
        return [c for c in candidates if self.low <= _port(c.address) <= self.high]
