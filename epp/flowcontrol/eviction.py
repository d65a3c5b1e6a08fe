"""In-flight eviction (``flowControl.enableEviction``): revoke dispatched sheddable requests when a
higher band is blocked, sized and paced as the reference does (pkg/epp/flowcontrol/eviction and
controller/internal/reclamation.go). Sans-I/O: the waiting room tracks what it dispatched, asks
``Reclamation`` what to revoke on a head-of-line block, and tells it when a revoked stream ended.

- Victims: the dispatched requests the filter policy accepts, in the ordering policy's order (by
  default the reference's ``sheddable-eviction-filter`` and
  ``priority-then-time-eviction-order-policy``: priority < 0, lowest priority first, then the most
  recently dispatched; epp's ``priority-then-progress-eviction-order-policy`` puts the requests
  whose response has not started before those already streaming).
- Trigger: the dispatch is blocked at band i and the gate is open; the first band j >= i whose
  priority is above the victim's, whose ceiling is > 0 and reached, and which has queued requests
  is the demand.
- Sizing, in the saturation gauge's units: n = max(1, ceil((saturation - ceiling - pending) /
  (saturation / in flight))), at most 2 and at most the evictable count; every victim's priority
  strictly below the demand band's.
- Pacing: stop and wait. No new decision while a revocation is unconfirmed (its stream has not
  ended; 10 s at most) or cooling (``grace`` after it ended: 10 ms for the concurrency detector,
  whose counts drop when the stream ends; else the scrape interval + metrics staleness + 250 ms
  for the engine to free the work and a fresh scrape to show it).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from epp.flowcontrol.contract import EvictionFilterPolicy, EvictionOrderingPolicy

K = TypeVar("K", bound=Hashable)

MAX_REVOCATIONS_PER_DECISION = 2
CONFIRMATION_TIMEOUT = 10.0  # seconds an unconfirmed revocation may hold the gate closed
LEADING_SENSOR_GRACE = 0.010  # the concurrency detector: its counts drop with the stream
ENGINE_RECLAIM_BUDGET = 0.250  # the engine's abort and KV cleanup, before a scrape can show it


def confirmation_grace(detector_type: str, refresh_interval: float, staleness: float) -> float:
    """How long freed capacity takes to show in the detector's gauge after a revoked stream ended."""
    if detector_type == "concurrency-detector":
        return LEADING_SENSOR_GRACE
    return refresh_interval + staleness + ENGINE_RECLAIM_BUDGET


class _Tracked(Generic[K]):
    __slots__ = ("dispatched", "evictable", "key", "priority", "started", "victim_key")

    def __init__(self, key: K, priority: int, dispatched: float, evictable: bool, started: bool = False) -> None:
        self.key = key
        self.priority = priority
        self.dispatched = dispatched
        self.evictable = evictable
        self.started = started
        self.victim_key: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class EvictionPolicies:
    """Which dispatched requests may be revoked, and in which order."""

    filter: EvictionFilterPolicy
    order: EvictionOrderingPolicy


class InFlight(Generic[K]):
    """Dispatched requests by key; the evictable ones (the filter accepts them) in victim order."""

    __slots__ = ("_entries", "_heap", "_seq", "evictable", "policies")

    def __init__(self, policies: EvictionPolicies) -> None:
        self.policies = policies
        self._entries: dict[K, _Tracked[K]] = {}
        # (victim key, seq, entry), smallest first; an entry that left (or moved: its response
        # started) stays until it comes up (evictable False).
        self._heap: list[tuple[tuple[float, ...], int, _Tracked[K]]] = []
        self._seq = itertools.count()
        self.evictable = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def track(self, key: K, priority: int, dispatched: float, evictable: bool = True) -> bool:
        """``evictable`` False: counted in flight, never a victim (its front end cannot end it).
        Returns whether it may be a victim."""
        self.untrack(key)
        entry = _Tracked(key, priority, dispatched, evictable and self.policies.filter.accept(priority))
        self._entries[key] = entry
        if entry.evictable:
            self._push(entry)
            self.evictable += 1
        return entry.evictable

    def started(self, key: K) -> None:
        """``key``'s response started: its place among the victims is asked again (and moves if
        the ordering policy reads it)."""
        entry = self._entries.get(key)
        if entry is None or entry.started:
            return
        entry.started = True
        if not entry.evictable:
            return
        victim_key = self.policies.order.victim_key(entry.priority, entry.dispatched, True)
        if victim_key == entry.victim_key:
            return
        entry.evictable = False  # (the old heap entry is dropped when it comes up)
        moved = _Tracked(key, entry.priority, entry.dispatched, True, started=True)
        self._entries[key] = moved
        self._push(moved, victim_key)

    def _push(self, entry: _Tracked[K], victim_key: tuple[float, ...] | None = None) -> None:
        if victim_key is None:
            victim_key = self.policies.order.victim_key(entry.priority, entry.dispatched, entry.started)
        entry.victim_key = victim_key
        heapq.heappush(self._heap, (entry.victim_key, next(self._seq), entry))

    def untrack(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and entry.evictable:
            entry.evictable = False
            self.evictable -= 1

    def _head(self) -> _Tracked[K] | None:
        h = self._heap
        while h and not h[0][2].evictable:
            heapq.heappop(h)
        return h[0][2] if h else None

    def victim_priority(self) -> int | None:
        head = self._head()
        return None if head is None else head.priority

    def pop_victim(self, below: int) -> K | None:
        """The next victim, out of tracking, if its priority is below ``below``."""
        head = self._head()
        if head is None or head.priority >= below:
            return None
        heapq.heappop(self._heap)
        self.untrack(head.key)
        return head.key


def demand(priorities: Sequence[int], ceilings: Sequence[float], saturation: float, blocked: int,
           victim_priority: int, has_queued: Callable[[int], bool]) -> int | None:
    """The index of the band eviction would make room for, or None (``priorities`` highest first,
    ``blocked`` the index dispatch stopped at)."""
    for j in range(blocked, len(priorities)):
        p = priorities[j]
        if p <= victim_priority:
            return None
        if ceilings[j] <= 0 or saturation < ceilings[j]:
            continue  # never dispatches, whatever is freed / dispatches on its own
        if has_queued(p):
            return j
    return None


@dataclass(slots=True)
class Reclamation(Generic[K]):
    """Sizing and stop-and-wait pacing of revocations."""

    grace: float
    max_per_decision: int = MAX_REVOCATIONS_PER_DECISION
    timeout: float = CONFIRMATION_TIMEOUT
    outstanding: dict[K, tuple[float, float]] = field(default_factory=dict)  # key -> (credit, issued at)
    cooling: list[tuple[float, float]] = field(default_factory=list)  # (credit, until)
    pending: float = 0.0  # credit issued and not yet visible in the gauge
    timed_out: list[K] = field(default_factory=list)  # retired by timeout since last read (for metrics)
    reclaim_target: float = 0.0  # the last deficit sized

    def gate_open(self, now: float) -> bool:
        for key, (credit, issued) in list(self.outstanding.items()):
            if now - issued >= self.timeout:
                del self.outstanding[key]
                self.cooling.append((credit, now + self.grace))
                self.timed_out.append(key)
        if self.cooling:
            kept = [c for c in self.cooling if now < c[1]]
            if len(kept) != len(self.cooling):
                self.pending = max(0.0, self.pending - sum(c[0] for c in self.cooling if now >= c[1]))
                self.cooling = kept
        return not self.outstanding and not self.cooling

    def size(self, saturation: float, ceiling: float, in_flight: int, evictable: int) -> tuple[int, float]:
        """(how many to revoke, the credit each one is worth); (0, 0) for none."""
        if in_flight <= 0 or evictable <= 0:
            return 0, 0.0
        credit = saturation / in_flight
        if credit <= 0 or math.isnan(credit) or math.isinf(credit):
            return 0, 0.0
        self.reclaim_target = saturation - ceiling
        net = self.reclaim_target - self.pending
        if net < 0 or (net == 0 and self.pending > 0):
            return 0, 0.0
        n = max(1, math.ceil(net / credit))
        return min(n, self.max_per_decision, evictable), credit

    def issued(self, key: K, credit: float, now: float) -> None:
        self.outstanding[key] = (credit, now)
        self.pending += credit

    def confirm(self, key: K, now: float) -> float | None:
        """The revoked request's stream ended: seconds since it was issued (None: not outstanding)."""
        r = self.outstanding.pop(key, None)
        if r is None:
            return None
        self.cooling.append((r[0], now + self.grace))
        return now - r[1]
