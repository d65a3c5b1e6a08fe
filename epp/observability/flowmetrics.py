"""Flow-control metrics, by the reference's names: ``llm_d_epp_flow_control_*`` and the
deprecated ``inference_extension_flow_control_*`` twins it still emits.

Per request: the queue duration (by fairness id, priority, outcome, pool and models), the
enqueue duration, and ``llm_d_epp_flow_control_requests_total`` by outcome. At scrape time
(``FlowCollector``): queue size and bytes per flow, pool saturation per stage, endpoints with
stale metrics, and each band's and the pool's capacity utilization.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.observability.metrics import Children

QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONFIRMATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CYCLE_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
PREFIXES = ("llm_d_epp_", "inference_extension_")  # the current name first, then the deprecated one
QueueKey = tuple[str, str, str, str]  # fairness id, priority, model, target model (bounded label values)


@dataclass(slots=True)
class FlowGauges:
    """What the scrape reads from the waiting room."""

    queued: Mapping[QueueKey, tuple[int, int]] = field(default_factory=dict)  # -> (requests, bytes)
    saturation: Mapping[str, float] = field(default_factory=dict)  # stage -> value
    stale_endpoints: int = 0
    detector: str = ""
    bands: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # priority, n, cap, bytes, cap
    pool: tuple[int, int, int, int] = (0, 0, 0, 0)  # n, cap (0 none), bytes, cap (0 none)
    families: list[Metric] = field(default_factory=list)  # the policies' own (program-aware fairness)


class FlowMetrics:
    def __init__(self, registry: CollectorRegistry, pool_name: str) -> None:
        self.pool = pool_name
        queue = ["fairness_id", "priority", "outcome", "inference_pool", "model_name", "target_model_name"]
        self.queue_duration = [Histogram(f"{p}flow_control_request_queue_duration_seconds",
                                         "Time requests spend in flow control, from enqueue to their outcome.",
                                         queue, buckets=QUEUE_BUCKETS, registry=registry) for p in PREFIXES]
        self.enqueue_duration = [Histogram(f"{p}flow_control_request_enqueue_duration_seconds",
                                           "Time taken to enqueue a request into flow control.",
                                           ["fairness_id", "priority", "outcome"], buckets=CYCLE_BUCKETS,
                                           registry=registry) for p in PREFIXES]
        self.dispatch_cycle = [Histogram(f"{p}flow_control_dispatch_cycle_duration_seconds",
                                         "Time taken by one dispatch cycle of flow control.", buckets=CYCLE_BUCKETS,
                                         registry=registry) for p in PREFIXES]
        self.requests = Counter("llm_d_epp_flow_control_requests", "Requests by their flow-control outcome.",
                                ["outcome", "priority", "inference_pool"], registry=registry)
        self.revocations_issued = Counter(
            "llm_d_epp_flow_control_revocations_issued", "In-flight eviction revocations issued, by the demand "
            "band's priority.", ["priority", "inference_pool"], registry=registry)
        self.revocations = Counter(
            "llm_d_epp_flow_control_revocations", "In-flight eviction revocations by outcome (confirmed, timed_out).",
            ["outcome", "inference_pool"], registry=registry)
        self.reclaim_target = Gauge("llm_d_epp_flow_control_reclaim_target",
                                    "Last computed reclamation deficit, in saturation-gauge units.",
                                    ["inference_pool"], registry=registry)
        self.pending_reclaim = Gauge(
            "llm_d_epp_flow_control_pending_reclaim",
            "Sum of outstanding and cooling pending-reclaim debits, in saturation-gauge units.",
            ["inference_pool"], registry=registry)
        self.confirmation = Histogram("llm_d_epp_flow_control_revocation_confirmation_seconds",
                                      "Time from revocation issue to confirmed stream termination.", ["inference_pool"],
                                      buckets=CONFIRMATION_BUCKETS, registry=registry)
        self._child = Children()

    def revoked(self, demand_priority: int, n: int, target: float, pending: float) -> None:
        self._child(self.revocations_issued, str(demand_priority), self.pool).inc(n)
        self._child(self.reclaim_target, self.pool).set(target)
        self._child(self.pending_reclaim, self.pool).set(pending)

    def revocation_ended(self, outcome: str, seconds: float | None, pending: float) -> None:
        self._child(self.revocations, outcome, self.pool).inc()
        if seconds is not None:
            self._child(self.confirmation, self.pool).observe(seconds)
        self._child(self.pending_reclaim, self.pool).set(pending)

    def ended(self, key: QueueKey, outcome: str, queued_seconds: float) -> None:
        fairness, priority, model, target = key
        for h in self.queue_duration:
            self._child(h, fairness, priority, outcome, self.pool, model, target).observe(queued_seconds)
        self._child(self.requests, outcome, priority, self.pool).inc()

    def enqueued(self, key: QueueKey, outcome: str, seconds: float) -> None:
        for h in self.enqueue_duration:
            self._child(h, key[0], key[1], outcome).observe(seconds)

    def cycle(self, seconds: float) -> None:
        for h in self.dispatch_cycle:
            h.observe(seconds)


class FlowCollector(Collector):
    def __init__(self, pool_name: str, read: Callable[[], FlowGauges]) -> None:
        self.pool = pool_name
        self.read = read

    def collect(self) -> Iterator[Metric]:
        g = self.read()
        pool = self.pool
        yield from g.families
        for prefix in PREFIXES:
            labels = ["fairness_id", "priority", "inference_pool", "model_name", "target_model_name"]
            size = GaugeMetricFamily(f"{prefix}flow_control_queue_size",
                                     "Requests held in the flow-control queues.", labels=labels)
            nbytes = GaugeMetricFamily(f"{prefix}flow_control_queue_bytes",
                                       "Bytes of the requests held in the flow-control queues.", labels=labels)
            for (fairness, priority, model, target), (n, b) in g.queued.items():
                size.add_metric([fairness, priority, pool, model, target], n)
                nbytes.add_metric([fairness, priority, pool, model, target], b)
            sat = GaugeMetricFamily(f"{prefix}flow_control_pool_saturation",
                                    "Pool saturation gating dispatch (1.0 the set point; 'effective' gates).",
                                    labels=["inference_pool", "stage"])
            for stage, value in g.saturation.items():
                sat.add_metric([pool, stage], value)
            yield size
            yield nbytes
            yield sat
        stale = GaugeMetricFamily("llm_d_epp_flow_control_stale_endpoints",
                                  "Endpoints the saturation detector scores as saturated for stale metrics.",
                                  labels=["detector"])
        stale.add_metric([g.detector], g.stale_endpoints)
        yield stale
        req = GaugeMetricFamily("llm_d_epp_flow_control_capacity_utilization_requests",
                                "Share of a band's request capacity in use.", labels=["priority", "inference_pool"])
        byt = GaugeMetricFamily("llm_d_epp_flow_control_capacity_utilization_bytes",
                                "Share of a band's byte capacity in use.", labels=["priority", "inference_pool"])
        for band, n, n_cap, b, b_cap in g.bands:
            req.add_metric([str(band), pool], n / n_cap if n_cap else 0.0)
            byt.add_metric([str(band), pool], b / b_cap if b_cap else 0.0)
        yield req
        yield byt
        total, n_cap, total_bytes, b_cap = g.pool
        if n_cap:
            f = GaugeMetricFamily("llm_d_epp_flow_control_global_capacity_utilization_requests",
                                  "Share of the pool's request capacity in use.", labels=["inference_pool"])
            f.add_metric([pool], total / n_cap)
            yield f
        if b_cap:
            f = GaugeMetricFamily("llm_d_epp_flow_control_global_capacity_utilization_bytes",
                                  "Share of the pool's byte capacity in use.", labels=["inference_pool"])
            f.add_metric([pool], total_bytes / b_cap)
            yield f
