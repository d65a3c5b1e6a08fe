"""Flow-control policies, as the reference names and defines them.

Ordering (within a flow): ``fcfs-ordering-policy`` (enqueue time), ``edf-ordering-policy``
(enqueue time + the queue-wait budget; no budget sorts last), ``slo-deadline-ordering-policy``
(arrival + the request's ``x-llm-d-slo-ttft-ms``; no SLO sorts last), and epp's own
``least-prefill-ordering-policy``: the request with the fewest prompt tokens to compute first
(estimated at arrival on the endpoint that has most of the prompt cached), less
``agingTokensPerSecond`` (default 1,000) for each second it has waited, then arrival. Under
overload it serves the cheap requests (warm chat turns, short prompts) and the queue budget sheds
the costly ones: more requests meet their SLO for the same GPU time.
Fairness (between the flows of a band): ``global-strict-fairness-policy`` (the flow whose head
orders first, as if the band were one queue), ``round-robin-fairness-policy`` (the next flow with
work, in turn), ``program-aware-fairness`` (least attained service: epp.flowcontrol.programs).
Usage limits (per-band ceilings): ``static-usage-limit-policy`` (``threshold``, default 1.0),
``priority-holdback-policy`` (``minCeiling`` required, ``maxCeiling`` 1.0, ``domain`` rank or
value, ``shape`` linear), ``soft-reflective-ceiling-policy`` (no parameters).
In-flight eviction (no parameters; the defaults when no entry declares one):
``sheddable-eviction-filter`` (priority < 0 may be revoked) and
``priority-then-time-eviction-order-policy`` (lowest priority first, then the newest dispatch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

from epp.flowcontrol.contract import (
    BandView,
    EvictionFilterPolicy,
    EvictionOrderingPolicy,
    FairnessPolicy,
    OrderingPolicy,
    QueuedRequest,
    UsageLimitPolicy,
)
from epp.flowcontrol.programs import ProgramAwareFairness
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError

LAST = math.inf


class _NoParams:
    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()


# -- ordering --------------------------------------------------------------------------------------
class FCFSOrdering(_NoParams, OrderingPolicy):
    type_name: ClassVar[str] = "fcfs-ordering-policy"

    def key(self, item: QueuedRequest) -> tuple[float, float]:
        return item.enqueued, 0.0


class EDFOrdering(_NoParams, OrderingPolicy):
    type_name: ClassVar[str] = "edf-ordering-policy"

    def key(self, item: QueuedRequest) -> tuple[float, float]:
        return (item.enqueued + item.ttl if item.ttl > 0 else LAST), item.enqueued


class SLODeadlineOrdering(_NoParams, OrderingPolicy):
    type_name: ClassVar[str] = "slo-deadline-ordering-policy"

    def key(self, item: QueuedRequest) -> tuple[float, float]:
        slo = item.slo_ttft
        return (item.received + slo if slo is not None else LAST), item.received


class LeastPrefillOrdering(OrderingPolicy):
    type_name: ClassVar[str] = "least-prefill-ordering-policy"
    reads_prefill_estimate: ClassVar[bool] = True

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.aging = params.float("agingTokensPerSecond", 1000.0, minimum=0.0)
        params.done()

    def key(self, item: QueuedRequest) -> tuple[float, float]:
        # cost - aging * (now - enqueued) orders as cost + aging * enqueued at any ``now``.
        return item.cost + self.aging * item.enqueued, item.enqueued


# -- fairness ----------------------------------------------------------------------------------------
class GlobalStrictFairness(_NoParams, FairnessPolicy):
    type_name: ClassVar[str] = "global-strict-fairness-policy"
    orders_band: ClassVar[bool] = True

    def new_state(self) -> Any:
        return None

    def pick(self, band: BandView, state: Any) -> QueuedRequest | None:
        return band.first()


class RoundRobinFairness(_NoParams, FairnessPolicy):
    type_name: ClassVar[str] = "round-robin-fairness-policy"

    def new_state(self) -> Any:
        return None

    def pick(self, band: BandView, state: Any) -> QueuedRequest | None:
        # The flows with work come in turn order: serve the first, then it goes last.
        for q in band.in_turn():
            band.rotate(q.flow_id)
            return q.peek()
        return None


# -- usage limits -------------------------------------------------------------------------------------
class StaticUsageLimit(UsageLimitPolicy):
    type_name: ClassVar[str] = "static-usage-limit-policy"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.threshold = params.float("threshold", 1.0)
        params.done()

    def compute(self, saturation: float, priorities: Sequence[int], ceilings: list[float]) -> None:
        for i in range(len(priorities)):
            ceilings[i] = self.threshold


class PriorityHoldback(UsageLimitPolicy):
    """Lower bands are gated at lower saturation: ceilings spread over [minCeiling, maxCeiling]
    by rank (equal steps) or by priority value (proportional); one band alone gets maxCeiling."""

    type_name: ClassVar[str] = "priority-holdback-policy"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        if "minCeiling" not in params.names():
            raise ConfigError(f"{params.path}.minCeiling", "required")
        self.min_ceiling = params.float("minCeiling", 0.0)
        self.max_ceiling = params.float("maxCeiling", 1.0)
        self.domain = params.text("domain", "rank", choices=("rank", "value")) or "rank"
        params.text("shape", "linear", choices=("linear",))
        params.done()
        if not 0.0 <= self.min_ceiling < 1.0:
            raise ConfigError(f"{params.path}.minCeiling", f"must be in [0.0, 1.0), got {self.min_ceiling:g}")
        if not 0.0 < self.max_ceiling <= 1.0:
            raise ConfigError(f"{params.path}.maxCeiling", f"must be in (0.0, 1.0], got {self.max_ceiling:g}")
        if self.min_ceiling >= self.max_ceiling:
            raise ConfigError(f"{params.path}.minCeiling", f"must be less than maxCeiling ({self.max_ceiling:g})")

    def compute(self, saturation: float, priorities: Sequence[int], ceilings: list[float]) -> None:
        n = len(priorities)
        lo, hi = self.min_ceiling, self.max_ceiling
        if n == 1:
            ceilings[0] = hi
            return
        if self.domain == "rank":
            for i in range(n):
                ceilings[i] = hi - i * (hi - lo) / (n - 1)
            return
        p_max, p_min = priorities[0], priorities[-1]
        for i, p in enumerate(priorities):
            ceilings[i] = hi if p_max == p_min else lo + (p - p_min) / (p_max - p_min) * (hi - lo)


class SoftReflectiveCeiling(UsageLimitPolicy):
    """The top band is never gated; band i of n is gated once saturation reaches
    1 - i * saturation / (n - 1), and then opens on one dispatch cycle in
    round(saturation / (1 - saturation)) (every gated band on the same cycles)."""

    type_name: ClassVar[str] = "soft-reflective-ceiling-policy"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()
        self.tick = 0

    def compute(self, saturation: float, priorities: Sequence[int], ceilings: list[float]) -> None:
        n = len(priorities)
        if n == 0:
            return
        open_now = False
        if 1.0 - saturation <= saturation < 1.0:
            period = max(1, round(saturation / (1.0 - saturation + 1e-9)))
            self.tick += 1
            open_now = self.tick % period == 0
        ceilings[0] = 1.0
        for i in range(1, n):
            reflective = 1.0 - i * saturation / (n - 1)
            if saturation < reflective:
                ceilings[i] = 1.0
            elif saturation >= 1.0:
                ceilings[i] = 0.0
            else:
                ceilings[i] = 1.0 if open_now else 0.0


# -- in-flight eviction --------------------------------------------------------------------------------
class SheddableEvictionFilter(_NoParams, EvictionFilterPolicy):
    type_name: ClassVar[str] = "sheddable-eviction-filter"

    def accept(self, priority: int) -> bool:
        return priority < 0


class PriorityThenTimeEvictionOrder(_NoParams, EvictionOrderingPolicy):
    type_name: ClassVar[str] = "priority-then-time-eviction-order-policy"

    def victim_key(self, priority: int, dispatched: float, started: bool) -> tuple[float, ...]:
        return float(priority), -dispatched


class PriorityThenProgressEvictionOrder(_NoParams, EvictionOrderingPolicy):
    """epp's own: lowest priority first, then the requests whose response has not started (still
    queued or in prefill at the pod: in gateway mode their client gets a whole 429, no stream the
    client was reading is cut, and their prompt tokens are what a token-counting detector holds),
    then the most recently dispatched."""

    type_name: ClassVar[str] = "priority-then-progress-eviction-order-policy"

    def victim_key(self, priority: int, dispatched: float, started: bool) -> tuple[float, ...]:
        return float(priority), float(started), -dispatched


FLOW_POLICIES: tuple[type[Any], ...] = (FCFSOrdering, EDFOrdering, SLODeadlineOrdering, GlobalStrictFairness,
                                        RoundRobinFairness, ProgramAwareFairness, StaticUsageLimit, PriorityHoldback,
                                        SoftReflectiveCeiling, LeastPrefillOrdering, SheddableEvictionFilter,
                                        PriorityThenTimeEvictionOrder, PriorityThenProgressEvictionOrder)
