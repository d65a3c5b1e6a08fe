"""The waiting room: flow control in the request path, between admission and scheduling.

The director hands every request to ``admit``. The controller (epp.flowcontrol.controller)
rejects it, or queues it; ``pump`` then dispatches what may go now, this request included when
nothing is ahead of it, so an idle pool adds no wait. A dispatched request is scheduled against
the snapshot of that moment (late binding) by the director's ``deliver``, and its front end hears
through ``Waiting.ready``. Pumps run on arrivals, on every response's end, and on a short tick
while anything waits (which also sees scrapes and expires budgets). Every queued request ends
exactly once: dispatched, or refused with a status and the reference's drop reason, or removed
because its client went away (then nothing is sent).

With in-flight eviction on, the room also tracks what it dispatched until it ends (``finished``);
when dispatch stops at a ceiling with higher-priority work queued, it revokes dispatched
sheddable requests through their front ends (``Routed.revoke``: a 429 with the drop reason
``evicted``), as many and as often as ``Reclamation`` allows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol, cast

from epp.datastore.store import Datastore, Snapshot
from epp.flowcontrol.contract import ChangesWithTime, ObservesFlows, QueuedRequest
from epp.flowcontrol.controller import FlowController, FlowSettings, Outcome
from epp.flowcontrol.eviction import InFlight, Reclamation, confirmation_grace
from epp.observability.flowmetrics import FlowGauges, FlowMetrics, QueueKey
from epp.requestcontrol.headers import SLO_TTFT_MS, header
from epp.requestcontrol.pending import Pending
from epp.requestcontrol.refused import EVICTED, NO_ENDPOINTS, SATURATED, SHUTTING_DOWN, TTL_EXPIRED, Refused
from epp.scheduling.contract import ExportsMetrics, declares

if TYPE_CHECKING:
    from epp.observability.metrics import RequestLabels
    from epp.request import InferenceRequest
    from epp.requestcontrol.routed import RequestInput, ResponseAccess, Routed

log = logging.getLogger("epp.flowcontrol")

TICK = 0.02  # seconds between pumps while requests wait (scrapes land in between)


class Waiting(Pending):
    """A request held by flow control."""

    __slots__ = ("access", "arrived", "fairness", "given", "item", "key", "labels", "queued_at", "room")

    def __init__(self, room: WaitingRoom, given: RequestInput, access: ResponseAccess, request: InferenceRequest,
                 labels: RequestLabels, arrived: float) -> None:
        super().__init__(request)
        self.room = room
        self.given = given
        self.access = access
        self.labels = labels
        self.arrived = arrived
        self.key: QueueKey = (labels.fairness, labels.priority, labels.model, labels.target)
        self.item: QueuedRequest | None = None
        self.queued_at = 0.0
        self.fairness: ObservesFlows | None = None  # the dispatching band's policy, when it observes flows

    @property
    def queued_seconds(self) -> float:
        return self.room.clock() - self.queued_at

    def cancel(self) -> None:
        self.room.cancel(self)


class Timers(Protocol):
    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle: ...


def _timed(settings: FlowSettings) -> ChangesWithTime | None:
    """The detector, when its reading changes with time alone."""
    detector = settings.detector
    return cast(ChangesWithTime, detector) if declares(detector, ChangesWithTime) else None


def _running_loop() -> Timers | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _refusal(outcome: Outcome, priority: int) -> Refused:
    """What a request that flow control did not dispatch is told (OpenAI-style JSON; the
    reference's status codes and drop reasons)."""
    if outcome is Outcome.REJECTED_CAPACITY:
        return Refused(429, f"flow control: the queue is full (priority {priority}); retry later", dropped=SATURATED)
    if outcome is Outcome.REJECTED_NO_ENDPOINTS:
        return Refused(503, "flow control: the pool has no endpoints and the queue is full", dropped=NO_ENDPOINTS)
    if outcome is Outcome.EVICTED_TTL:
        return Refused(429, "flow control: the request waited its queue budget (defaultRequestTTL) for capacity; "
                            "retry later", dropped=TTL_EXPIRED)
    if outcome is Outcome.EVICTED_NO_ENDPOINTS:
        return Refused(503, "flow control: no endpoint appeared within noEndpointRequestTTL", dropped=NO_ENDPOINTS)
    if outcome is Outcome.EVICTED_OTHER:
        return Refused(429, "flow control: evicted from the queue to make room for higher-priority requests",
                       dropped=EVICTED)
    return Refused(503, "flow control is shutting down", dropped=SHUTTING_DOWN)


class WaitingRoom:
    def __init__(self, settings: FlowSettings, store: Datastore, deliver: Callable[[Waiting], Routed | Refused],
                 refused: Callable[[Waiting, Refused], Refused], metrics: FlowMetrics | None = None,
                 estimate: Callable[[Waiting], tuple[int, dict[str, int]]] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 timers: Callable[[], Timers | None] = _running_loop) -> None:
        self.controller = FlowController(settings)
        self.store = store
        self.deliver = deliver  # schedules a dispatched request
        self.refused = refused  # counts and logs a refusal of a held request
        self.metrics = metrics
        # (prompt tokens, those cached on each endpoint): what a request would compute where (for the
        # orderings and the detector that read it)
        self.estimate = estimate
        self._estimates = estimate is not None and settings.reads_prefill_estimate()
        self._timed = _timed(settings)
        self.clock = clock
        self._timers = timers
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when it fires (this room's clock)
        self._pumping = False
        self._again = False
        self.queued: dict[QueueKey, list[int]] = {}  # -> [requests, bytes], for the queue gauges
        # In-flight eviction: what was dispatched and has not ended, and the revocations' pacing.
        self.inflight: InFlight[Routed] | None = None
        self.reclamation: Reclamation[Routed] | None = None
        self._evicting(settings)

    def reconfigure(self, settings: FlowSettings) -> None:
        self.controller.reconfigure(settings)
        self._estimates = self.estimate is not None and settings.reads_prefill_estimate()
        self._timed = _timed(settings)
        self._evicting(settings)
        self.pump()

    def _evicting(self, settings: FlowSettings) -> None:
        """Eviction on or off (a reload); on, the grace follows the detector in use."""
        policies = settings.eviction
        if policies is None:
            self.inflight = None
            self.reclamation = None
            return
        grace = confirmation_grace(settings.detector.type_name, self.store.refresh_interval, self.store.staleness)
        if self.inflight is None:
            self.inflight = InFlight(policies)
        self.inflight.policies = policies  # (for requests dispatched from now on)
        if self.reclamation is None:
            self.reclamation = Reclamation(grace)
        self.reclamation.grace = grace

    # -- arrivals -----------------------------------------------------------------------------------
    def admit(self, w: Waiting) -> None:
        """Queue ``w`` and pump; raises Refused when the controller rejects it."""
        started = time.perf_counter()
        now = self.clock()
        self._observe_pool(now)
        given = w.given
        size = len(given.body) if given.body is not None else len(w.request.prompt)
        item = QueuedRequest(w.labels.fairness, w.request.priority, size, w.arrived, w, _slo_seconds(w.request))
        if self._estimates and self.estimate is not None:
            item.prompt_tokens, item.matched = self.estimate(w)
            item.cost = max(0, item.prompt_tokens - max(item.matched.values(), default=0))
        outcome, evicted = self.controller.enqueue(item, now)
        for victim in evicted:
            self._left(victim, Outcome.EVICTED_OTHER)
            self._resolve(victim.payload, self.refused(victim.payload, _refusal(Outcome.EVICTED_OTHER,
                                                                                  victim.priority)))
        m = self.metrics
        if m is not None:
            m.enqueued(w.key, outcome.value if outcome else "NotYetFinalized", time.perf_counter() - started)
        if outcome is not None:
            if m is not None:
                m.ended(w.key, outcome.value, 0.0)
            raise _refusal(outcome, item.priority)
        w.item = item
        w.queued_at = now
        counts = self.queued.setdefault(w.key, [0, 0])
        counts[0] += 1
        counts[1] += size
        self.pump()
        self._arm()

    def cancel(self, w: Waiting) -> None:
        """The client went away: out of the queue, never dispatched, nothing sent."""
        item = w.item
        if item is not None and self.controller.cancel(item):
            self._left(item, Outcome.EVICTED_CONTEXT_CANCELLED)

    # -- dispatch -----------------------------------------------------------------------------------
    def pump(self) -> None:
        """Dispatch every request that may go now (re-entrant calls fold into the running one)."""
        if self._pumping:
            self._again = True
            return
        controller = self.controller
        if not controller.queues.totals.count:
            return
        self._pumping = True
        try:
            again = True
            while again:
                self._again = False
                started = time.perf_counter()
                store = self.store
                pool = _schedulable(store.snapshot()).endpoints
                while True:
                    # Saturation over the endpoints the scheduler will choose from (fresh ones),
                    # not the whole list: pods not scraped yet are no capacity.
                    item = controller.next(replace(store.snapshot(), endpoints=pool))
                    if item is None:
                        if controller.blocked is not None and self.inflight is not None:
                            self._reclaim()
                        break
                    self._left(item, Outcome.DISPATCHED)
                    w: Waiting = item.payload
                    policy = controller.queues.bands[item.priority].config.fairness
                    if declares(policy, ObservesFlows):
                        w.fairness = observer = cast(ObservesFlows, policy)
                        observer.on_dispatched(item.flow_id, self.clock() - w.queued_at)
                    try:
                        result = self.deliver(w)
                    except Exception:  # epp's bug: the request still ends, with a status
                        log.exception("dispatching request %s failed", w.request.request_id or "-")
                        result = Refused(500, "internal error while dispatching the request")
                    self._resolve(w, result)
                if self.metrics is not None:
                    self.metrics.cycle(time.perf_counter() - started)
                again = self._again
        finally:
            self._pumping = False
        if self._timed is not None:
            self._arm()  # (the detector may free capacity before the next tick)

    def started(self, routed: Routed) -> None:
        """A dispatched request's response started (its place among eviction victims may move)."""
        if self.inflight is not None:
            self.inflight.started(routed)

    def finished(self, routed: Routed) -> None:
        """A dispatched request ended (served, failed, or revoked): capacity freed."""
        inflight = self.inflight
        if inflight is not None:
            inflight.untrack(routed)
            rc = self.reclamation
            if rc is not None and routed in rc.outstanding:
                seconds = rc.confirm(routed, self.clock())
                if self.metrics is not None:
                    self.metrics.revocation_ended("confirmed", seconds, rc.pending)
        self.pump()

    def _reclaim(self) -> None:
        """Dispatch stopped at a ceiling: revoke dispatched sheddable requests if that lets
        queued higher-priority work go (epp.flowcontrol.eviction)."""
        inflight, rc = self.inflight, self.reclamation
        if inflight is None or rc is None:
            return
        now = self.clock()
        gate = rc.gate_open(now)
        if rc.timed_out:
            for lost in rc.timed_out:
                log.warning("revoked request %s did not end within %.0f s; treated as ended",
                            lost.request.request_id or "-", rc.timeout)
                if self.metrics is not None:
                    self.metrics.revocation_ended("timed_out", None, rc.pending)
            rc.timed_out.clear()
        if not gate:
            return
        victim_priority = inflight.victim_priority()
        if victim_priority is None:
            return
        found = self.controller.eviction_demand(victim_priority)
        if found is None:
            return
        demand_priority, ceiling, saturation = found
        n, credit = rc.size(saturation, ceiling, len(inflight), inflight.evictable)
        issued = 0
        while issued < n:
            victim = inflight.pop_victim(demand_priority)
            if victim is None:
                break
            revoke = victim.revoke
            if victim.done or revoke is None:  # its front end cannot end it (the Pick API, observed mode)
                if not victim.done:
                    inflight.track(victim, victim.request.priority, now, evictable=False)
                continue
            rc.issued(victim, credit, now)
            issued += 1
            log.info("evicting request %s (priority %d) for queued priority %d work: saturation %.2f, ceiling %.2f",
                     victim.request.request_id or "-", victim.request.priority, demand_priority, saturation, ceiling)
            try:
                revoke()
            except Exception:  # epp's bug: logged; the confirmation timeout reopens the gate
                log.exception("revoking request %s failed", victim.request.request_id or "-")
        if issued and self.metrics is not None:
            self.metrics.revoked(demand_priority, issued, rc.reclaim_target, rc.pending)

    def tick(self) -> None:
        """Expire what ran out of budget, then pump (the timer calls it while anything waits)."""
        self._timer = None
        try:
            now = self.clock()
            self._observe_pool(now)
            expired, outcome = self.controller.expire(now)
            for item in expired:
                self._left(item, outcome)
                self._resolve(item.payload, self.refused(item.payload, _refusal(outcome, item.priority)))
            self.pump()
        except Exception:  # epp's bug: logged, and the tick keeps running (never a silently dead timer)
            log.exception("flow control tick failed")
        finally:
            self._arm()

    def release_all(self) -> None:
        """Flow control was turned off: everything queued dispatches now, ungated."""
        for item in self.controller.drain():
            self._left(item, Outcome.DISPATCHED)
            w: Waiting = item.payload
            self._resolve(w, self.deliver(w))
        self._disarm()

    def close(self) -> None:
        """Shutting down: every queued request gets 503."""
        for item in self.controller.drain():
            self._left(item, Outcome.EVICTED_OTHER)
            self._resolve(item.payload, self.refused(item.payload, _refusal(Outcome.REJECTED_OTHER, item.priority)))
        self._disarm()

    # -- internals ------------------------------------------------------------------------------------
    def _observe_pool(self, now: float) -> None:
        self.controller.observe_pool(not self.store.snapshot().endpoints, now)

    def _left(self, item: QueuedRequest, outcome: Outcome) -> None:
        w: Waiting = item.payload
        counts = self.queued.get(w.key)
        if counts is not None:
            counts[0] -= 1
            counts[1] -= item.size
            if counts[0] <= 0:
                del self.queued[w.key]
        if self.metrics is not None:
            self.metrics.ended(w.key, outcome.value, self.clock() - w.queued_at)

    def _resolve(self, w: Waiting, result: Routed | Refused) -> None:
        inflight = self.inflight
        if inflight is not None and not isinstance(result, Refused):
            result.revocable = inflight.track(result, w.request.priority, self.clock())
        ready = w.ready
        if ready is None:
            w.result = result
            return
        try:
            ready(result)
        except Exception:
            log.exception("answering request %s failed", w.request.request_id or "-")

    def _arm(self) -> None:
        """Keep a tick coming while anything waits: every TICK, sooner for the next expiry or the
        moment the detector's reading changes by itself (an armed tick that would come later is
        moved up)."""
        if not self.controller.queues.totals.count:
            return
        now = self.clock()
        at = now + TICK
        expiry = self.controller.next_expiry()
        if expiry is not None:
            at = min(at, expiry)
        if self._timed is not None:
            snapshot = self.store.snapshot()
            change = self._timed.next_change(snapshot)
            if change is not None:
                at = min(at, now + change - snapshot.now)  # (the datastore's clock, not this room's)
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
            self._timer = None
        timers = self._timers()
        if timers is None:
            return
        self._timer_at = at
        self._timer = timers.call_later(max(0.0, at - now), self.tick)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def gauges(self, pool: str = "default") -> FlowGauges:
        c = self.controller
        snap = self.store.snapshot()
        c.saturation(snap)  # now, not at the last dispatch (which may be long ago)
        saturation = c.last_saturation
        s = c.settings
        t = c.queues.totals
        bands = [(p, b.count, b.config.max_requests, b.nbytes, b.config.max_bytes) for p, b in c.queues.bands.items()]
        policies = {id(p): p for p in (s.fairness, *(b.config.fairness for b in c.queues.bands.values()))}
        families = [f for p in policies.values() if declares(p, ExportsMetrics)
                    for f in cast(ExportsMetrics, p).metric_families(pool)]
        return FlowGauges({k: (v[0], v[1]) for k, v in self.queued.items()}, saturation,
                          s.detector.stale_count(snap, snap.endpoints), s.detector.name, bands,
                          (t.count, s.max_requests, t.nbytes, s.max_bytes), families)


def _schedulable(snapshot: Snapshot) -> Snapshot:
    """The snapshot narrowed as the scheduler narrows it: the endpoints with fresh metrics, or all
    of them when none is fresh."""
    fresh = snapshot.fresh()
    return replace(snapshot, endpoints=fresh) if fresh and len(fresh) < len(snapshot.endpoints) else snapshot


def _slo_seconds(request: InferenceRequest) -> float | None:
    text = header(request.headers, SLO_TTFT_MS).strip()
    if not text.isdigit():
        return None
    return int(text) / 1000.0

