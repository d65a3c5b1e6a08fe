"""The waiting room as plain data: priority bands of flows, each flow a queue ordered by its
band's ordering policy; byte and request counts per band and for the pool.

No clocks, no I/O, no callbacks: the controller (epp.flowcontrol.controller) decides what to
admit, dispatch and expire; this module keeps the counts exact. A removed request is marked and
skipped when it reaches a heap's top (a heap is rebuilt when dead entries outnumber the live).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from epp.flowcontrol.contract import QueuedRequest

if TYPE_CHECKING:
    from epp.flowcontrol.contract import FairnessPolicy, OrderingPolicy

DEFAULT_FLOW = ""  # requests without a fairness id


@dataclass(slots=True)
class BandConfig:
    """A priority band's caps and policies (the reference's PriorityBandConfig, resolved)."""

    priority: int
    max_bytes: int
    max_requests: int
    fairness: FairnessPolicy
    ordering: OrderingPolicy


class _Heap:
    """Requests by (key, seq); removed ones are dropped when they reach the top, and the heap is
    rebuilt when they outnumber the live ones."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: list[tuple[tuple[float, float], int, QueuedRequest]] = []

    def push(self, item: QueuedRequest) -> None:
        heapq.heappush(self.entries, (item.key, item.seq, item))

    def top(self) -> QueuedRequest | None:
        entries = self.entries
        while entries and not entries[0][2].queued:
            heapq.heappop(entries)
        return entries[0][2] if entries else None

    def compact(self, live: int) -> None:
        entries = self.entries
        if not live:
            entries.clear()
        elif len(entries) > 64 and len(entries) > 2 * live:
            self.entries = [e for e in entries if e[2].queued]
            heapq.heapify(self.entries)


class FlowQueue:
    """One flow's requests in one band. It orders them itself unless its band orders all its
    flows' requests as one queue (global-strict fairness); then it only counts them."""

    __slots__ = ("count", "flow_id", "heap", "nbytes", "ordering")

    def __init__(self, flow_id: str, ordering: OrderingPolicy, ordered: bool) -> None:
        self.flow_id = flow_id
        self.ordering = ordering  # the policy its keys came from (a reload keeps queued keys)
        self.heap = _Heap() if ordered else None
        self.count = 0
        self.nbytes = 0

    def peek(self) -> QueuedRequest | None:
        return self.heap.top() if self.heap is not None else None

    def first_few(self, depth: int) -> list[QueuedRequest]:
        """Queued requests near the front, in order: those among the first ``depth`` places of its
        heap (the top levels: the first is the head; past it they are some of the next, not all)."""
        if self.heap is None:
            return []
        near = sorted(self.heap.entries[:depth], key=lambda e: (e[0], e[1]))
        return [e[2] for e in near if e[2].queued]


class Band:
    """A priority band: its flows (the non-empty ones in ``active``; ``turns`` their ids in order).

    Turns go as the reference's round robin has them: flows in id order, starting after the flow
    served last (``cursor``), so a flow that gets work comes before the one just served."""

    __slots__ = ("_before", "active", "config", "count", "cursor", "flows", "heap", "nbytes", "order",
                 "policy_state", "priority", "turns")

    def __init__(self, config: BandConfig) -> None:
        self.priority = config.priority
        self.config = config
        self.policy_state: Any = config.fairness.new_state()
        self.flows: dict[str, FlowQueue] = {}
        self.active: dict[str, FlowQueue] = {}
        self.turns: list[str] = []  # the active flows' ids, sorted
        self.cursor: str | None = None  # the flow served last
        self._before: str | None = None  # the cursor before the last turn was taken
        self.order: deque[QueuedRequest] = deque()  # enqueue order (removed ones skipped lazily)
        # One heap over all flows when the fairness policy orders the band as one queue.
        self.heap = _Heap() if config.fairness.orders_band else None
        self.count = 0
        self.nbytes = 0

    def reconfigure(self, config: BandConfig) -> None:
        old = self.config
        self.config = config
        if config.fairness is not old.fairness:
            self.policy_state = config.fairness.new_state()
        if config.fairness.orders_band != old.fairness.orders_band:  # re-file what waits, keys kept
            self.heap = _Heap() if config.fairness.orders_band else None
            for q in self.flows.values():
                q.heap = None if self.heap is not None else _Heap()
            for item in self.order:
                if item.queued:
                    self._file(self.flows[item.flow_id], item)

    def _file(self, q: FlowQueue, item: QueuedRequest) -> None:
        if self.heap is not None:
            self.heap.push(item)
        else:
            assert q.heap is not None
            q.heap.push(item)

    def first(self) -> QueuedRequest | None:
        """The request whose key is smallest over all the band's flows (ordered bands only)."""
        return self.heap.top() if self.heap is not None else None

    def in_turn(self) -> Iterator[FlowQueue]:
        """The flows with work in turn order: the first after the one served last (by id)."""
        turns, active = self.turns, self.active
        start = 0 if self.cursor is None else bisect.bisect_right(turns, self.cursor)
        for i in range(start, start + len(turns)):
            yield active[turns[i % len(turns)]]

    def rotate(self, flow_id: str) -> None:
        self._before, self.cursor = self.cursor, flow_id

    def keep_turn(self, flow_id: str) -> None:
        if self.cursor == flow_id:
            self.cursor = self._before

    def activate(self, q: FlowQueue) -> None:
        self.active[q.flow_id] = q
        bisect.insort(self.turns, q.flow_id)

    def deactivate(self, flow_id: str) -> None:
        if self.active.pop(flow_id, None) is not None:
            del self.turns[bisect.bisect_left(self.turns, flow_id)]

    def newest(self) -> QueuedRequest | None:
        """The most recently enqueued request (the first evicted when room is needed)."""
        order = self.order
        while order and not order[-1].queued:
            order.pop()
        return order[-1] if order else None

    def flow(self, flow_id: str) -> FlowQueue:
        q = self.flows.get(flow_id)
        if q is None:
            q = self.flows[flow_id] = FlowQueue(flow_id, self.config.ordering, self.heap is None)
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
        band._file(q, item)
        q.count += 1
        q.nbytes += item.size
        if q.count == 1:
            band.activate(q)
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
        q.count -= 1
        q.nbytes -= item.size
        if q.heap is not None:
            q.heap.compact(q.count)
        if q.count == 0:
            band.deactivate(item.flow_id)
            del band.flows[item.flow_id]
        band.count -= 1
        band.nbytes -= item.size
        if band.heap is not None:
            band.heap.compact(band.count)
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
