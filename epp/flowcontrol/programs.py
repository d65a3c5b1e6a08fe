"""``program-aware-fairness``: the reference's fairness between programs (flows), by least
attained service.

A program is a fairness id. Each one's attained service is the weighted tokens its requests
used (prompt + 2 x completion, from the responses' usage), decayed with a half-life
(``lasHalfLifeSeconds``, default 60; 0 = no decay). Among a band's flows with work, the one with
the best ``lasWeightService`` x (1 - service, min-max normalised) + ``lasWeightHeadWait`` x (its
head's wait, min-max normalised) dispatches (defaults 0.8 and 0.2). A program without requests
in flight and no completion for ``evictionTtlSeconds`` (3600) is forgotten, checked every
``evictionSweepSeconds`` (300). Metrics: ``llm_d_epp_program_aware_jains_fairness_index`` (over
the programs' mean queue waits), ``..._avg_wait_time_milliseconds{program_id}``,
``..._attained_service_tokens{program_id}`` (program ids are bounded as every fairness label).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from prometheus_client.core import GaugeMetricFamily, Metric

from epp.flowcontrol.contract import BandView, FairnessPolicy, ObservesFlows, QueuedRequest
from epp.scheduling.contract import ExportsMetrics, ReadsClock
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError

INPUT_WEIGHT, OUTPUT_WEIGHT = 1, 2


@dataclass(slots=True)
class Program:
    service: float = 0.0
    anchor: float = 0.0  # when ``service`` was last decayed
    waits: float = 0.0  # seconds waited in the queue, summed
    dispatched: int = 0
    inflight: int = 0
    last_done: float = 0.0


class ProgramAwareFairness(FairnessPolicy, ObservesFlows, ExportsMetrics, ReadsClock):
    type_name: ClassVar[str] = "program-aware-fairness"

    def __init__(self, name: str, params: Params, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        params.text("strategy", "las", choices=("las",))
        self.weight_service = params.float("lasWeightService", 0.8, minimum=0.0)
        self.weight_wait = params.float("lasWeightHeadWait", 0.2, minimum=0.0)
        self.half_life = params.float("lasHalfLifeSeconds", 60.0, minimum=0.0)
        self.eviction_ttl = params.float("evictionTtlSeconds", 3600.0, minimum=0.0)
        self.sweep_every = params.float("evictionSweepSeconds", 300.0)
        params.done()
        if self.sweep_every <= 0:
            raise ConfigError(f"{params.path}.evictionSweepSeconds", "must be > 0")
        self.clock = clock
        self.programs: dict[str, Program] = {}
        self._swept = clock()

    def use_clock(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._swept = clock()

    def new_state(self) -> Any:
        return None  # the programs are the plugin's, across bands (one instance, as the reference)

    def _program(self, flow_id: str) -> Program:
        p = self.programs.get(flow_id)
        if p is None:
            p = self.programs[flow_id] = Program(anchor=self.clock(), last_done=self.clock())
        return p

    def _service(self, p: Program, now: float) -> float:
        if self.half_life > 0 and now > p.anchor:
            p.service *= math.exp2(-(now - p.anchor) / self.half_life)
        p.anchor = now
        return p.service

    def pick(self, band: BandView, state: Any) -> QueuedRequest | None:
        now = self.clock()
        self._sweep(now)
        heads = [(q.flow_id, head) for q in band.in_turn() if (head := q.peek()) is not None]
        if not heads:
            return None
        services = [self._service(self._program(fid), now) for fid, _ in heads]
        waits = [now - head.enqueued for _, head in heads]
        lo_s, hi_s, lo_w, hi_w = min(services), max(services), min(waits), max(waits)

        def norm(v: float, lo: float, hi: float) -> float:
            return 0.5 if hi == lo else (v - lo) / (hi - lo)

        best = max(range(len(heads)), key=lambda i: self.weight_service * (1 - norm(services[i], lo_s, hi_s))
                   + self.weight_wait * norm(waits[i], lo_w, hi_w))
        return heads[best][1]

    def on_dispatched(self, flow_id: str, waited: float) -> None:
        p = self._program(flow_id)
        p.waits += waited
        p.dispatched += 1
        p.inflight += 1

    def on_completed(self, flow_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        now = self.clock()
        p = self._program(flow_id)
        p.inflight = max(0, p.inflight - 1)
        p.last_done = now
        self._service(p, now)
        p.service += INPUT_WEIGHT * prompt_tokens + OUTPUT_WEIGHT * completion_tokens

    def _sweep(self, now: float) -> None:
        if now - self._swept < self.sweep_every:
            return
        self._swept = now
        for fid in [f for f, p in self.programs.items() if not p.inflight and now - p.last_done > self.eviction_ttl]:
            del self.programs[fid]

    def jains_index(self) -> float:
        waits = [p.waits / p.dispatched * 1000 for p in self.programs.values() if p.dispatched]
        total, squares = sum(waits), sum(w * w for w in waits)
        return total * total / (len(waits) * squares) if squares else 1.0

    def metric_families(self, pool: str) -> Iterable[Metric]:
        now = self.clock()
        jain = GaugeMetricFamily("llm_d_epp_program_aware_jains_fairness_index",
                                 "Jain's fairness index over the programs' mean queue waits (1.0: equal).")
        jain.add_metric([], self.jains_index())
        wait = GaugeMetricFamily("llm_d_epp_program_aware_avg_wait_time_milliseconds",
                                 "Mean flow-control queue wait per program.", labels=["program_id"])
        service = GaugeMetricFamily("llm_d_epp_program_aware_attained_service_tokens",
                                    "Time-decayed attained service (weighted tokens) per program.",
                                    labels=["program_id"])
        for fid, p in self.programs.items():
            if p.dispatched:
                wait.add_metric([fid], p.waits / p.dispatched * 1000)
            service.add_metric([fid], self._service(p, now))
        return [jain, wait, service]
