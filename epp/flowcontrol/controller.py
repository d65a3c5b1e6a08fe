"""The flow controller: admit into the waiting room, choose what dispatches now, expire.

Sans-I/O: every method takes the time (and the snapshot) it should decide on; the request-control
layer (epp.requestcontrol.waiting) calls it on arrivals, releases and ticks, and acts on what it
returns. Semantics are the reference's (pkg/epp/flowcontrol):

- Caps: the pool's ``maxBytes`` / ``maxRequests`` (0 = none) and each band's (0 = the defaults,
  1 GB and 5,000). A request over a cap is rejected at once (RejectedCapacity, or
  RejectedNoEndpoints while the pool is empty). epp adds displacement: when the pool cap is what
  is full, queued sheddable requests (priority < 0) of lower bands are evicted, lowest band and
  newest first, to make room for a higher-priority one. With active-active replicas the pool caps
  count what waits in the others' rooms too (``elsewhere``, as last published); band caps are
  per replica.
- Dispatch: bands in priority order; the usage-limit policy gives each band a ceiling and the
  first band whose ceiling the saturation reaches stops dispatch (head-of-line blocking, so a
  lower band never overtakes a gated higher one). Within a band the fairness policy picks the
  flow and the flow's head goes. With a detector that admits by cost (``tokensMustFit``), a head
  whose work fits on no endpoint keeps its turn while a request near the front of its flow or of
  the next flows in turn that fits goes instead (``_backfill``); when none fits, the band waits.
- Saturation is the detector's over the pool, taken per stage as the reference does
  (prefill = prefill and encode-prefill pods, decode = decode and unlabelled pods, both = pods
  that do both; the maximum of the stages gates).
- In-flight eviction (``eviction``): when dispatch stops at a ceiling, ``eviction_demand`` says
  whether a higher band's queued work would go if a dispatched sheddable request were revoked
  (the waiting room tracks those and paces the revocations, epp.flowcontrol.eviction).
- TTL: ``defaultRequestTTL`` while the pool has endpoints (EvictedTTL), ``noEndpointRequestTTL``
  while it has none (EvictedNoEndpoints); a regime change starts a fresh budget. 0 = no expiry.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import cast

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.flowcontrol.contract import (
    AdmitsByCost,
    FairnessPolicy,
    OrderingPolicy,
    QueuedRequest,
    SaturationDetector,
    UsageLimitPolicy,
)
from epp.flowcontrol.eviction import EvictionPolicies, demand
from epp.flowcontrol.queues import Band, BandConfig, Queues
from epp.scheduling.contract import declares

DEFAULT_BAND_MAX_BYTES = 1_000_000_000
DEFAULT_BAND_MAX_REQUESTS = 5000
DEFAULT_TTL = 60.0
ROLE_LABEL = "llm-d.ai/role"
# While the head in turn waits for room (a detector that admits by cost), what else may go: the
# first places of each flow's queue, of the first flows in turn.
BACKFILL_FLOWS = 8
BACKFILL_DEPTH = 15  # a heap's top four levels
PREFILL_ROLES = frozenset(("prefill", "encode-prefill"))
DECODE_ROLES = frozenset(("decode", ""))
BOTH_ROLES = frozenset(("prefill-decode", "both", "encode-prefill-decode"))


class Outcome(Enum):
    """A request's end in flow control (the reference's outcome names, as the metrics show them)."""

    DISPATCHED = "Dispatched"
    REJECTED_CAPACITY = "RejectedCapacity"
    REJECTED_NO_ENDPOINTS = "RejectedNoEndpoints"
    REJECTED_OTHER = "RejectedOther"
    EVICTED_TTL = "EvictedTTL"
    EVICTED_NO_ENDPOINTS = "EvictedNoEndpoints"
    EVICTED_CONTEXT_CANCELLED = "EvictedContextCancelled"
    EVICTED_OTHER = "EvictedOther"


@dataclass(frozen=True, slots=True)
class BandSpec:
    """A band as configured: 0 caps take the defaults, None policies the section's defaults."""

    max_bytes: int = 0
    max_requests: int = 0
    fairness: FairnessPolicy | None = None
    ordering: OrderingPolicy | None = None


@dataclass(frozen=True, slots=True)
class FlowSettings:
    """The ``flowControl`` section, resolved."""

    detector: SaturationDetector
    usage_limit: UsageLimitPolicy
    fairness: FairnessPolicy  # the default (global-strict)
    ordering: OrderingPolicy  # the default (fcfs)
    default_ttl: float = DEFAULT_TTL
    no_endpoint_ttl: float = DEFAULT_TTL
    max_bytes: int = 0
    max_requests: int = 0
    bands: Mapping[int, BandSpec] = field(default_factory=dict)
    default_band: BandSpec = BandSpec()
    default_negative_band: BandSpec | None = None
    eviction: EvictionPolicies | None = None  # in-flight eviction (enableEviction), its victim policies

    def reads_prefill_estimate(self) -> bool:
        """Some band orders its requests by their estimated prefill (``QueuedRequest.cost``), or
        the detector admits by it."""
        specs = [self.default_band, *self.bands.values(), *filter(None, [self.default_negative_band])]
        return (any((s.ordering or self.ordering).reads_prefill_estimate for s in specs)
                or self.admits_by_cost() is not None)

    def admits_by_cost(self) -> AdmitsByCost | None:
        """The detector, when it holds requests whose own work fits nowhere yet."""
        d = self.detector
        return cast(AdmitsByCost, d) if declares(d, AdmitsByCost) and cast(AdmitsByCost, d).gates() else None

    def band_config(self, priority: int) -> BandConfig:
        spec = self.bands.get(priority)
        if spec is None:
            spec = self.default_negative_band if priority < 0 and self.default_negative_band else self.default_band
        return BandConfig(priority, spec.max_bytes or DEFAULT_BAND_MAX_BYTES,
                          spec.max_requests or DEFAULT_BAND_MAX_REQUESTS, spec.fairness or self.fairness,
                          spec.ordering or self.ordering)


class Stages:
    """The pool split by role label, cached per endpoint tuple (it changes on scrapes only)."""

    __slots__ = ("_for", "parts")

    def __init__(self) -> None:
        self._for: tuple[EndpointState, ...] | None = None
        self.parts: list[tuple[str, tuple[EndpointState, ...]]] = []

    def of(self, endpoints: tuple[EndpointState, ...]) -> list[tuple[str, tuple[EndpointState, ...]]]:
        if endpoints is not self._for:
            prefill, decode = [], []
            for e in endpoints:
                role = e.labels.get(ROLE_LABEL, "")
                if role in PREFILL_ROLES or role in BOTH_ROLES:
                    prefill.append(e)
                if role in DECODE_ROLES or role in BOTH_ROLES:
                    decode.append(e)
            self.parts = [(n, tuple(p)) for n, p in (("prefill", prefill), ("decode", decode)) if p]
            self._for = endpoints
        return self.parts


class FlowController:
    def __init__(self, settings: FlowSettings) -> None:
        self.settings = settings
        self.queues = Queues()
        self.pool_empty = False
        self.regime_since = 0.0
        self._stages = Stages()
        self._ceilings: list[float] = []
        self._last: tuple[tuple[str, float], ...] = ()
        self._effective = 1.0
        self.blocked: int | None = None  # the band index the last ``next`` stopped at (its ceiling reached)
        # Requests and bytes waiting in other active-active replicas' rooms: the pool caps count them.
        self.elsewhere: tuple[int, int] = (0, 0)
        self._gate = settings.admits_by_cost()

    def reconfigure(self, settings: FlowSettings) -> None:
        """New caps and policies for new requests; queued ones keep their place and keys."""
        self.settings = settings
        self._gate = settings.admits_by_cost()
        for p, band in self.queues.bands.items():
            band.reconfigure(settings.band_config(p))

    def observe_pool(self, empty: bool, now: float) -> None:
        if empty != self.pool_empty:
            self.pool_empty = empty
            self.regime_since = now

    # -- admission ------------------------------------------------------------------------------
    def _band(self, priority: int) -> Band:
        band = self.queues.band(priority)
        return band if band is not None else self.queues.add_band(self.settings.band_config(priority))

    def _fits_pool(self, size: int) -> bool:
        s, t = self.settings, self.queues.totals
        count, nbytes = self.elsewhere
        over_bytes = s.max_bytes and t.nbytes + nbytes + size > s.max_bytes
        return not (over_bytes or (s.max_requests and t.count + count + 1 > s.max_requests))

    def enqueue(self, item: QueuedRequest, now: float) -> tuple[Outcome | None, list[QueuedRequest]]:
        """Queue ``item``: (None, evicted) when queued, where ``evicted`` were displaced to make
        room; (outcome, []) when it is rejected."""
        band = self._band(item.priority)
        cfg = band.config
        rejected = Outcome.REJECTED_NO_ENDPOINTS if self.pool_empty else Outcome.REJECTED_CAPACITY
        if band.nbytes + item.size > cfg.max_bytes or band.count + 1 > cfg.max_requests:
            return rejected, []
        evicted: list[QueuedRequest] = []
        while not self._fits_pool(item.size):
            victim = self._displaceable(item.priority)
            if victim is None:
                break
            self.queues.remove(victim)
            evicted.append(victim)
        if not self._fits_pool(item.size):
            return rejected, evicted
        item.ttl = self.settings.default_ttl
        self.queues.push(band, item, now)
        return None, evicted

    def _displaceable(self, priority: int) -> QueuedRequest | None:
        """The newest queued request of the lowest sheddable band below ``priority``."""
        q = self.queues
        for p in reversed(q.priorities):
            if p >= 0 or p >= priority:
                return None
            victim = q.bands[p].newest()
            if victim is not None:
                return victim
        return None

    def cancel(self, item: QueuedRequest) -> bool:
        return self.queues.remove(item)

    # -- dispatch ----------------------------------------------------------------------------------
    def saturation(self, snapshot: Snapshot) -> float:
        detector = self.settings.detector
        parts = self._stages.of(snapshot.endpoints)
        if len(parts) == 1:  # one stage (no P/D labels): the usual case, kept cheap
            effective = detector.saturation(snapshot, parts[0][1])
            self._last = ((parts[0][0], effective),)
            self._effective = effective
            return effective
        values = tuple((name, detector.saturation(snapshot, endpoints)) for name, endpoints in parts)
        effective = max(v for _, v in values) if values else detector.saturation(snapshot, snapshot.endpoints)
        self._last = values
        self._effective = effective
        return effective

    @property
    def last_saturation(self) -> dict[str, float]:
        """Stage -> saturation at the last evaluation, with the 'effective' one that gates."""
        return {**dict(self._last), "effective": self._effective}

    def next(self, snapshot: Snapshot) -> QueuedRequest | None:
        """The request to dispatch now (taken out of the queues), or None: empty, or gated."""
        q = self.queues
        self.blocked = None
        if not q.totals.count:
            return None
        saturation = self.saturation(snapshot)
        priorities = q.priorities
        ceilings = self._ceilings
        if len(ceilings) != len(priorities):
            ceilings = self._ceilings = [1.0] * len(priorities)
        self.settings.usage_limit.compute(saturation, priorities, ceilings)
        gate = self._gate
        for i, p in enumerate(priorities):
            if saturation >= ceilings[i]:
                self.blocked = i
                return None
            band = q.bands[p]
            if not band.count:
                continue
            head = band.config.fairness.pick(band, band.policy_state)
            if head is None:
                continue
            if gate is not None and not gate.fits(head, snapshot, snapshot.endpoints):
                band.keep_turn(head.flow_id)  # its own work fits on no endpoint yet: it keeps its turn
                head = self._backfill(band, head, gate, snapshot)
                if head is None:  # nothing near the front fits either: the band waits, as at a ceiling
                    self.blocked = i
                    return None
            q.remove(head)
            return head
        return None

    @staticmethod
    def _backfill(band: Band, held: QueuedRequest, gate: AdmitsByCost, snapshot: Snapshot) -> QueuedRequest | None:
        """While ``held`` (the head in turn) fits nowhere: the first request near the front of a
        flow (``BACKFILL_DEPTH`` places of each of ``BACKFILL_FLOWS`` flows, in turn order, the
        held one's own first) that fits now. Work that could run is not held behind work waiting
        for its pod; the turn stays with ``held``. Not for a band its policy orders as one queue."""
        if band.config.fairness.orders_band:
            return None
        for q in itertools.islice(band.in_turn(), BACKFILL_FLOWS):
            for item in q.first_few(BACKFILL_DEPTH):
                if item is not held and gate.fits(item, snapshot, snapshot.endpoints):
                    return item
        return None

    def eviction_demand(self, victim_priority: int) -> tuple[int, float, float] | None:
        """After ``next`` stopped at a ceiling: (the demand band's priority, its ceiling, the
        saturation) when evicting a dispatched request of ``victim_priority`` would make room for
        queued work of a higher band (epp.flowcontrol.eviction.demand)."""
        if self.blocked is None:
            return None
        q = self.queues
        priorities = q.priorities
        j = demand(priorities, self._ceilings, self._effective, self.blocked, victim_priority,
                   lambda p: q.bands[p].count > 0)
        return None if j is None else (priorities[j], self._ceilings[j], self._effective)

    # -- expiry --------------------------------------------------------------------------------------
    def budget(self) -> tuple[float, Outcome]:
        s = self.settings
        if self.pool_empty:
            return s.no_endpoint_ttl, Outcome.EVICTED_NO_ENDPOINTS
        return s.default_ttl, Outcome.EVICTED_TTL

    def next_expiry(self) -> float | None:
        """When the oldest queued request runs out of budget (None: nothing queued, or no TTL)."""
        budget, _ = self.budget()
        oldest = self.queues.oldest()
        if oldest is None or budget <= 0:
            return None
        return max(oldest.enqueued, self.regime_since) + budget

    def expire(self, now: float) -> tuple[list[QueuedRequest], Outcome]:
        """Take out every request whose budget has run out at ``now``."""
        budget, outcome = self.budget()
        out: list[QueuedRequest] = []
        if budget <= 0:
            return out, outcome
        q = self.queues
        since = self.regime_since
        while True:
            oldest = q.oldest()
            if oldest is None or now < max(oldest.enqueued, since) + budget:
                return out, outcome
            q.remove(oldest)
            out.append(oldest)

    def drain(self) -> list[QueuedRequest]:
        """Take everything out (flow control turned off, or shutdown), oldest first."""
        items = list(self.queues.items())
        for item in items:
            self.queues.remove(item)
        return items

    def ceilings(self, saturation: float) -> Sequence[float]:
        priorities = self.queues.priorities
        ceilings = [1.0] * len(priorities)
        self.settings.usage_limit.compute(saturation, priorities, ceilings)
        return ceilings
