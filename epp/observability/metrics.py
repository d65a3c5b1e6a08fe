"""The picker's Prometheus metrics, named as the reference names them where it has a name."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from epp.scheduling.contract import ExportsMetrics, HoldsPrefixIndex, declares

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from epp.datastore.store import Datastore

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
REQUEST_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30,
                   45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)


class PoolCollector(Collector):
    """Pool gauges computed from the datastore at scrape time."""

    def __init__(self, store: Datastore, pool_name: str) -> None:
        self.store = store
        self.pool = pool_name

    def collect(self) -> Iterator[Metric]:
        snap = self.store.snapshot()
        fresh = [e for e in snap.endpoints if e.fresh(snap.now, snap.staleness)]
        kv = GaugeMetricFamily("inference_pool_average_kv_cache_utilization",
                               "Average KV cache utilization of the pool's fresh endpoints.", labels=["name"])
        q = GaugeMetricFamily("inference_pool_average_queue_size",
                              "Average waiting queue of the pool's fresh endpoints.", labels=["name"])
        ready = GaugeMetricFamily("inference_pool_ready_pods", "Endpoints with fresh metrics.", labels=["name"])
        per = GaugeMetricFamily("inference_pool_per_pod_queue_size", "Waiting queue per endpoint.",
                                labels=["name", "model_server_pod"])
        inflight = GaugeMetricFamily("epp_endpoint_inflight_requests", "Requests epp routed that have not ended.",
                                     labels=["name", "endpoint"])
        if fresh:
            kv.add_metric([self.pool], sum(e.signals.kv_usage for e in fresh if e.signals) / len(fresh))
            q.add_metric([self.pool], sum(e.signals.waiting for e in fresh if e.signals) / len(fresh))
        else:
            kv.add_metric([self.pool], 0.0)
            q.add_metric([self.pool], 0.0)
        ready.add_metric([self.pool], len(fresh))
        for e in snap.endpoints:
            if e.signals is not None:
                per.add_metric([self.pool, e.address], e.signals.waiting)
            inflight.add_metric([self.pool, e.address], snap.inflight.get(e.address, 0))
        yield from (kv, q, ready, per, inflight)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu = CounterMetricFamily("epp_picker_cpu_seconds", "CPU time (user+system) used by the picker process.")
        cpu.add_metric([], ru.ru_utime + ru.ru_stime)
        yield cpu


class PluginCollector(Collector):
    """What the current profile's plugins export (``ExportsMetrics``; families of the same name
    from several plugins are merged), the prefix index size of those that hold one, and the
    KV-event subscribers' counters. Read at scrape time, on the event loop."""

    def __init__(self, pool_name: str, plugins: Callable[[], list[Any]], kv_totals: Callable[[], Any]) -> None:
        self.pool = pool_name
        self.plugins = plugins
        self.kv_totals = kv_totals

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        index_size = 0
        for p in self.plugins():
            if declares(p, HoldsPrefixIndex):
                index_size += p.prefix_index_size()
            if declares(p, ExportsMetrics):
                for fam in p.metric_families(self.pool):
                    known = merged.get(fam.name)
                    if known is None:
                        merged[fam.name] = fam
                    else:
                        known.samples.extend(fam.samples)
        size = GaugeMetricFamily("inference_extension_prefix_indexer_size",
                                 "Block hashes held by the approximate prefix index.")
        size.add_metric([], float(index_size))
        yield size
        yield from merged.values()
        kv = self.kv_totals()
        if kv is not None:
            for name, help_text in (("batches", "KV event batches applied."), ("gaps", "Sequence gaps detected."),
                                    ("replayed", "Batches refilled from a replay socket."),
                                    ("lost", "Batches lost (the pod's blocks were cleared)."),
                                    ("restarts", "Publisher restarts detected."), ("bad", "Undecodable batches.")):
                fam = CounterMetricFamily(f"epp_kv_events_{name}", help_text, labels=["name"])
                fam.add_metric([self.pool], getattr(kv, name))
                yield fam


OTHER = "other"


class LabelValues:
    """Bounds a label whose values come from clients (the request's ``model``).

    Known values pass: the models the pool's servers report, and those the rewrite rules name.
    Of the others, the first ``limit`` distinct ones no longer than ``max_length`` are admitted
    (a pool whose servers do not name their model still gets per-model series); every later
    one is counted as ``other``. So no client can grow /metrics without bound."""

    def __init__(self, pool_models: Callable[[], Iterable[str]], limit: int = 64, max_length: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool_models = pool_models
        self.limit = limit
        self.max_length = max_length
        self.clock = clock
        self.known: frozenset[str] = frozenset()
        self.configured: frozenset[str] = frozenset()
        self.admitted: set[str] = set()
        self._refreshed = float("-inf")

    def set_configured(self, values: Iterable[str]) -> None:
        self.configured = frozenset(values)
        self._refreshed = float("-inf")

    def __call__(self, value: str) -> str:
        if value in self.admitted or value in self.known:
            return value
        now = self.clock()
        if now - self._refreshed >= 1.0:  # the pool's models, re-read at most once a second
            self._refreshed = now
            self.known = self.configured | frozenset(self.pool_models())
            if value in self.known:
                return value
        if len(self.admitted) >= self.limit or len(value) > self.max_length:
            return OTHER
        self.admitted.add(value)
        return value


class Frozen(Collector):
    """Metric families computed beforehand (on the event loop), rendered later (off it)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class _Joined(Collector):
    def __init__(self, *parts: Collector) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        for p in self.parts:
            yield from p.collect()


class PickerMetrics:
    """All of epp's metrics in one registry (no global state).

    Collectors that read loop-owned state (the datastore, the scorers) are ``loop_collectors``:
    ``prepare`` runs them on the event loop (cheap), and the returned collector renders
    everything, which can then run in a thread so a big exposition never stalls routing."""

    def __init__(self, store: Datastore, pool_name: str = "default", label_values: int = 64) -> None:
        self.models = LabelValues(store.served_models, label_values)
        self.loop_collectors: list[Collector] = [PoolCollector(store, pool_name)]
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("inference_objective_request", "Requests received, by model.",
                                ["model_name", "target_model_name"], registry=r)
        self.errors = Counter("inference_objective_request_error", "Requests refused or failed, by error code.",
                              ["model_name", "target_model_name", "error_code"], registry=r)
        self.duration = Histogram("inference_objective_request_duration_seconds",
                                  "Time from the pick to the end of the response.", ["model_name", "target_model_name"],
                                  buckets=REQUEST_BUCKETS, registry=r)
        self.scheduler_e2e = Histogram("inference_extension_scheduler_e2e_duration_seconds",
                                       "Scheduling latency per request.", buckets=LATENCY_BUCKETS, registry=r)
        self.plugin_duration = Histogram("inference_extension_plugin_duration_seconds",
                                         "Latency of each plugin per call.", ["plugin_type", "plugin_name"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.picks = Counter("epp_picks", "Picks per endpoint.", ["endpoint"], registry=r)
        self.scrape_errors = Counter("epp_metrics_scrape_errors", "Failed metric scrapes.", ["endpoint", "reason"],
                                     registry=r)
        self.scrape_parse = Histogram("epp_metrics_scrape_parse_seconds", "Time to parse one /metrics exposition.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.rewrites = Counter("epp_model_rewrites", "Requests whose model an InferenceModelRewrite changed.",
                                ["model_name", "target_model_name"], registry=r)
        self.config_reloads = Counter("epp_config_reloads", "Config reloads applied.", registry=r)
        ProcessCollector(registry=r)

        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached (labels() costs a lock and a dict build per call)."""
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def prepare(self) -> Collector:
        """Everything to render: the registry plus the loop collectors' families, read now."""
        families = [m for c in self.loop_collectors for m in c.collect()]
        return _Joined(self.registry, Frozen(families))

    def plugin_timer(self, plugin_type: str, name: str, seconds: float) -> None:
        self.child(self.plugin_duration, plugin_type, name).observe(seconds)
