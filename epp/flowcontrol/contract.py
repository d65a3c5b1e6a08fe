"""The flow-control extension points: each a plugin role, configured under ``plugins`` and named
from the ``flowControl`` section (the reference's types and parameters).

- ``SaturationDetector``: how full the pool is. 0 is idle, 1.0 the set point at which dispatch
  holds, above 1 oversubscribed; an empty pool reads 1.0. It is also a scheduling filter (the
  endpoints past their limit), so a profile may list it.
- ``FairnessPolicy``: which flow of a priority band dispatches next.
- ``OrderingPolicy``: which request of a flow goes first (the smaller key).
- ``UsageLimitPolicy``: each band's dispatch ceiling; a band dispatches while saturation < it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import Plugin
from epp.scheduling.types import CycleState


@dataclass(eq=False, slots=True)
class QueuedRequest:
    """One request in the waiting room. ``payload`` is the caller's (the director's pending pick)."""

    flow_id: str
    priority: int
    size: int  # bytes (the request body), counted against the byte caps
    received: float  # monotonic time the request arrived (slo-deadline ordering counts from it)
    payload: Any = None
    slo_ttft: float | None = None  # seconds, from the request's TTFT SLO header
    cost: int = 0  # prompt tokens to compute where most is cached, at arrival (when an ordering reads it)
    prompt_tokens: int = 0  # with ``matched`` (endpoint -> tokens cached there), when ``cost`` is read
    matched: Mapping[str, int] | None = None
    enqueued: float = 0.0
    ttl: float = 0.0  # the queue-wait budget at enqueue (0: none); EDF orders by enqueued + ttl
    key: tuple[float, float] = (0.0, 0.0)
    seq: int = 0
    queued: bool = False


class FlowHead(Protocol):
    """One flow of a band, as a fairness policy sees it."""

    flow_id: str

    def peek(self) -> QueuedRequest | None: ...


class BandView(Protocol):
    """A priority band, as a fairness policy sees it (epp.flowcontrol.queues.Band)."""

    def first(self) -> QueuedRequest | None:
        """The request with the smallest key over all flows (bands their policy orders as one queue)."""
        ...

    def in_turn(self) -> Iterable[FlowHead]:
        """The flows with work, in turn order: by flow id, from the first after the flow served
        last (the reference's round robin)."""
        ...

    def rotate(self, flow_id: str) -> None:
        """``flow_id`` had its turn: turns go on after it."""
        ...

    def keep_turn(self, flow_id: str) -> None:
        """What ``flow_id`` was picked for could not go: the turn it took is undone."""
        ...


class SaturationDetector(Plugin, Protocol):
    """The pool's saturation from the endpoints' signals (and epp's own in-flight counts)."""

    def saturation(self, snapshot: Snapshot, endpoints: Sequence[EndpointState]) -> float: ...

    def stale_count(self, snapshot: Snapshot, endpoints: Sequence[EndpointState]) -> int:
        """Endpoints scored saturated because their metrics are missing or stale (0: reads none)."""
        ...

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]: ...


class OrderingPolicy(Plugin, Protocol):
    """A queued request's place in its flow: smaller keys dispatch first (fixed at enqueue).
    A policy with ``reads_prefill_estimate`` orders by ``item.cost``, which the waiting room then
    fills in at enqueue (the scheduler's prefix matchers run once more per request for it)."""

    reads_prefill_estimate: ClassVar[bool] = False

    def key(self, item: QueuedRequest) -> tuple[float, float]: ...


class FairnessPolicy(Plugin, Protocol):
    """Chooses the flow of ``band`` to dispatch from and returns its head (None when every flow
    is empty). ``state`` is the band's own, made by ``new_state`` when the band is. A policy
    with ``orders_band`` sees the band as one queue (``band.first()``); the others choose among
    ``band.in_turn()`` and take the chosen flow's ``peek()``."""

    orders_band: ClassVar[bool] = False

    def new_state(self) -> Any: ...

    def pick(self, band: BandView, state: Any) -> QueuedRequest | None: ...


class ObservesFlows(Protocol):
    """A hook of fairness policies: a request of ``flow_id`` dispatched after waiting ``waited``
    seconds; one ended, having used ``prompt_tokens`` and ``completion_tokens`` (0 when the
    response did not say)."""

    def on_dispatched(self, flow_id: str, waited: float) -> None: ...

    def on_completed(self, flow_id: str, prompt_tokens: int, completion_tokens: int) -> None: ...


class ChangesWithTime(Protocol):
    """A hook of saturation detectors whose reading changes with time alone, no event needed
    (``concurrency-detector`` with ``prefillLookahead``): the next moment it does, or None."""

    def next_change(self, snapshot: Snapshot) -> float | None: ...


class AdmitsByCost(Protocol):
    """A hook of saturation detectors that hold a request whose own work fits nowhere yet
    (``concurrency-detector`` with ``tokensMustFit``): whether ``item``'s prompt tokens not cached
    on some endpoint (``QueuedRequest.prompt_tokens`` less its ``matched`` there, as found at
    arrival) fit there now. While they fit nowhere, it keeps its turn and a request near the front
    of its flow or the next flows that fits goes instead; when none does, its band waits (head of
    line), as at a ceiling."""

    def gates(self) -> bool:
        """Whether it holds any (its parameters may leave it off)."""

    def fits(self, item: QueuedRequest, snapshot: Snapshot, endpoints: Sequence[EndpointState]) -> bool: ...


class UsageLimitPolicy(Plugin, Protocol):
    """Writes each band's ceiling into ``ceilings`` (``priorities`` highest first, ceilings
    non-increasing)."""

    def compute(self, saturation: float, priorities: Sequence[int], ceilings: list[float]) -> None: ...


class EvictionFilterPolicy(Plugin, Protocol):
    """In-flight eviction: whether a dispatched request of ``priority`` may be revoked."""

    def accept(self, priority: int) -> bool: ...


class EvictionOrderingPolicy(Plugin, Protocol):
    """In-flight eviction: a dispatched request's place among the victims (smaller goes first).
    ``started``: its response's first bytes arrived (the pod computed its prompt; a stream has
    begun); the key is asked again when that happens."""

    def victim_key(self, priority: int, dispatched: float, started: bool) -> tuple[float, ...]: ...


ROLES: tuple[tuple[type[Any], str], ...] = ((SaturationDetector, "saturation detector"),
                                            (FairnessPolicy, "fairness policy"), (OrderingPolicy, "ordering policy"),
                                            (UsageLimitPolicy, "usage limit policy"),
                                            (EvictionFilterPolicy, "eviction filter policy"),
                                            (EvictionOrderingPolicy, "eviction ordering policy"))
ROLE_METHODS: dict[type[Any], tuple[str, ...]] = {SaturationDetector: ("saturation", "stale_count", "filter"),
                                                  FairnessPolicy: ("new_state", "pick"), OrderingPolicy: ("key",),
                                                  UsageLimitPolicy: ("compute",), EvictionFilterPolicy: ("accept",),
                                                  EvictionOrderingPolicy: ("victim_key",)}
HOOKS: tuple[tuple[type[Any], tuple[str, ...]], ...] = ((ObservesFlows, ("on_dispatched", "on_completed")),
                                                       (ChangesWithTime, ("next_change",)),
                                                       (AdmitsByCost, ("gates", "fits")))
