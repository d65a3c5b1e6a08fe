"""The waiting room as plain data: priority bands of flows, each flow a queue ordered by its
band's ordering policy; byte and request counts per band and for the pool.

No clocks, no I/O, no callbacks: the controller (epp.flowcontrol.controller) decides what to
admit, dispatch and expire; this module keeps the counts exact. A removed request is marked and
skipped when it reaches a heap's top (a heap is rebuilt when dead entries outnumber the live).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from epp.flowcontrol.contract import FairnessPolicy, OrderingPolicy

DEFAULT_FLOW = ""  # requests without a fairness id


@dataclass(eq=False, slots=True)
class QueuedRequest:
    """One request in the waiting room. ``payload`` is the caller's (the director's pending pick)."""

    flow_id: str
    priority: int
    size: int  # bytes (the request body), counted against the byte caps
    received: float  # monotonic time the request arrived (slo-deadline ordering counts from it)
    payload: Any = None
    slo_ttft: float | None = None  # seconds, from the request's TTFT SLO header
    enqueued: float = 0.0
    ttl: float = 0.0  # the queue-wait budget at enqueue (0: none); EDF orders by enqueued + ttl
    key: tuple[float, float] = (0.0, 0.0)
    seq: int = 0
    queued: bool = False


@dataclass(slots=True)
class BandConfig:
    """A priority band's caps and policies (the reference's PriorityBandConfig, resolved)."""

    priority: int
    max_bytes: int
    max_requests: int
    fairness: FairnessPolicy
    ordering: OrderingPolicy


class FlowQueue:
    """One flow's requests in one band, smallest key first."""

    __slots__ = ("_heap", "count", "flow_id", "nbytes", "ordering")

    def __init__(self, flow_id: str, ordering: OrderingPolicy) -> None:
        self.flow_id = flow_id
        self.ordering = ordering  # the policy its keys came from (a reload keeps queued keys)
        self._heap: list[tuple[tuple[float, float], int, QueuedRequest]] = []
        self.count = 0
        self.nbytes = 0

    def push(self, item: QueuedRequest) -> None:
        heapq.heappush(self._heap, (item.key, item.seq, item))
        self.count += 1
        self.nbytes += item.size

    def peek(self) -> QueuedRequest | None:
        heap = self._heap
        while heap and not heap[0][2].queued:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def forget(self, item: QueuedRequest) -> None:
        """``item`` (already marked not queued) leaves the counts; its heap entry goes lazily."""
        self.count -= 1
        self.nbytes -= item.size
        heap = self._heap
        if self.count == 0:
            heap.clear()
        elif len(heap) > 64 and len(heap) > 2 * self.count:
            self._heap = [e for e in heap if e[2].queued]
            heapq.heapify(self._heap)

    def items(self) -> Iterator[QueuedRequest]:
        return (e[2] for e in self._heap if e[2].queued)


class Band:
    """A priority band: its flows (the non-empty ones in ``active``, oldest activation first)."""

    __slots__ = ("active", "config", "count", "flows", "nbytes", "order", "policy_state", "priority")

    def __init__(self, config: BandConfig) -> None:
        self.priority = config.priority
        self.config = config
        self.policy_state: Any = config.fairness.new_state()
        self.flows: dict[str, FlowQueue] = {}
        self.active: OrderedDict[str, FlowQueue] = OrderedDict()
        self.order: deque[QueuedRequest] = deque()  # enqueue order (removed ones skipped lazily)
        self.count = 0
        self.nbytes = 0

    def reconfigure(self, config: BandConfig) -> None:
        if config.fairness is not self.config.fairness:
            self.policy_state = config.fairness.new_state()
        self.config = config

    def newest(self) -> QueuedRequest | None:
        """The most recently enqueued request (the first evicted when room is needed)."""
        order = self.order
        while order and not order[-1].queued:
            order.pop()
        return order[-1] if order else None

    def flow(self, flow_id: str) -> FlowQueue:
        q = self.flows.get(flow_id)
        if q is None:
            q = self.flows[flow_id] = FlowQueue(flow_id, self.config.ordering)
        return q


@dataclass(slots=True)
class Totals:
    count: int = 0
    nbytes: int = 0


class Queues:
    """Every band, the pool's totals, and all queued requests in enqueue order (for expiry)."""

    def __init__(self) -> None:
        self.bands: dict[int, Band] = {}
        self.priorities: list[int] = []  # highest first
        self.totals = Totals()
        self.arrivals: deque[QueuedRequest] = deque()  # enqueue order; removed ones skipped lazily
        self._seq = itertools.count()

    def band(self, priority: int) -> Band | None:
        return self.bands.get(priority)

    def add_band(self, config: BandConfig) -> Band:
        band = self.bands[config.priority] = Band(config)
        self.priorities = sorted(self.bands, reverse=True)
        return band

    def push(self, band: Band, item: QueuedRequest, now: float) -> None:
        item.enqueued = now
        item.seq = next(self._seq)
        q = band.flow(item.flow_id)
        item.key = q.ordering.key(item)
        item.queued = True
        q.push(item)
        if q.count == 1:
            band.active[item.flow_id] = q
        band.count += 1
        band.nbytes += item.size
        band.order.append(item)
        self.totals.count += 1
        self.totals.nbytes += item.size
        self.arrivals.append(item)

    def remove(self, item: QueuedRequest) -> bool:
        """Take ``item`` out (dispatched, expired, cancelled or evicted); False if it was not in."""
        if not item.queued:
            return False
        item.queued = False
        band = self.bands[item.priority]
        q = band.flows[item.flow_id]
        q.forget(item)
        if q.count == 0:
            band.active.pop(item.flow_id, None)
            del band.flows[item.flow_id]
        band.count -= 1
        band.nbytes -= item.size
        if not band.count:
            band.order.clear()
        elif len(band.order) > 1024 and len(band.order) > 2 * band.count:
            band.order = deque(i for i in band.order if i.queued)
        self.totals.count -= 1
        self.totals.nbytes -= item.size
        arrivals = self.arrivals
        while arrivals and not arrivals[0].queued:
            arrivals.popleft()
        if len(arrivals) > 1024 and len(arrivals) > 2 * self.totals.count:
            self.arrivals = deque(i for i in arrivals if i.queued)
        return True

    def oldest(self) -> QueuedRequest | None:
        arrivals = self.arrivals
        while arrivals and not arrivals[0].queued:
            arrivals.popleft()
        return arrivals[0] if arrivals else None

    def items(self) -> Iterator[QueuedRequest]:
        return (i for i in self.arrivals if i.queued)


@dataclass(slots=True)
class FlowStats:
    """One (band, flow)'s counts, for the metrics."""

    priority: int
    flow_id: str
    count: int
    nbytes: int


def flow_stats(queues: Queues) -> list[FlowStats]:
    return [FlowStats(p, fid, q.count, q.nbytes) for p in queues.priorities
            for fid, q in queues.bands[p].flows.items()]
