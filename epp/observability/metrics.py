"""The picker's Prometheus metrics, named as the reference names them where it has a name."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.observability.activity import Activity
from epp.observability.loopmetrics import LoopCounter, LoopGauge, LoopHistogram
from epp.scheduling.contract import ExportsMetrics, HoldsPrefixIndex, declares

if TYPE_CHECKING:
    from epp.datastore.store import Datastore

DEFAULT_FAIRNESS = "default-flow"  # the reference's fairness id of a request that names none
# The reference's buckets (pkg/epp/metrics/llm_d_router_metrics.go), for the series of the same names.
SIZE_BUCKETS = tuple(float(1 << k) for k in range(6, 31))  # 64 B .. 1 GiB
RESPONSE_SIZE_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072, 262144,
                 524288, 1048576)
OUTPUT_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
NTPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
TPOT_BUCKETS = (0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6,
                0.8, 1, 2)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2)
REQUEST_PROCESSING_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.25, 0.5, 1, 2.5, 5,
                              10)
RESPONSE_PROCESSING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                               2.5, 5)
SCHEDULER_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)  # the reference's
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
REQUEST_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30,
                   45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)


class Children:
    """``metric.labels(*labels)``, cached (labels() costs a lock and a dict build per call)."""

    __slots__ = ("_children",)

    def __init__(self) -> None:
        self._children: dict[tuple[Any, ...], Any] = {}

    def __call__(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c


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
        per_llmd = GaugeMetricFamily("llm_d_epp_per_endpoint_queue_size", "The total number of requests pending in "
                                     "the model server queue for each underlying endpoint.",
                                     labels=["name", "model_server_endpoint"])
        inflight = GaugeMetricFamily("epp_endpoint_inflight_requests", "Requests epp routed that have not ended.",
                                     labels=["name", "endpoint"])
        kvs = [e.signals.kv_usage for e in fresh if e.signals]
        queues = [e.signals.waiting for e in fresh if e.signals]
        runs = [e.signals.running for e in fresh if e.signals]
        kv.add_metric([self.pool], _mean(kvs))
        q.add_metric([self.pool], _mean(queues))
        ready.add_metric([self.pool], len(fresh))
        legacy_running = GaugeMetricFamily("inference_pool_average_running_requests",
                                           "Average running requests of the pool's fresh endpoints.", labels=["name"])
        legacy_running.add_metric([self.pool], _mean(runs))
        yield legacy_running
        # The reference's llm_d_epp_* pool gauges (mean and population standard deviation).
        for name, help_text, values, fn in (
                ("average_kv_cache_utilization", "Average KV cache utilization.", kvs, _mean),
                ("average_queue_size", "Average waiting queue size.", queues, _mean),
                ("average_running_requests", "Average running requests.", runs, _mean),
                ("std_dev_kv_cache_utilization", "Standard deviation of KV cache utilization.", kvs, _std),
                ("std_dev_queue_size", "Standard deviation of the waiting queue size.", queues, _std),
                ("std_dev_running_requests", "Standard deviation of running requests.", runs, _std)):
            fam = GaugeMetricFamily(f"llm_d_epp_{name}", help_text, labels=["name"])
            fam.add_metric([self.pool], fn(values))
            yield fam
        ready_endpoints = GaugeMetricFamily("llm_d_epp_ready_endpoints", "Endpoints with fresh metrics.",
                                            labels=["name"])
        ready_endpoints.add_metric([self.pool], len(fresh))
        yield ready_endpoints
        for e in snap.endpoints:
            if e.signals is not None:
                per.add_metric([self.pool, e.address], e.signals.waiting)
                per_llmd.add_metric([self.pool, e.address], e.signals.waiting)
            inflight.add_metric([self.pool, e.address], snap.inflight.get(e.address, 0))
        yield from (kv, q, ready, per, per_llmd, inflight)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu = CounterMetricFamily("epp_picker_cpu_seconds", "CPU time (user+system) used by the picker process.")
        cpu.add_metric([], ru.ru_utime + ru.ru_stime)
        yield cpu


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _std(values: list[float]) -> float:
    if not values:
        return 0.0
    m = _mean(values)
    return float((sum((v - m) ** 2 for v in values) / len(values)) ** 0.5)


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
        self.fairness = LabelValues(lambda: (DEFAULT_FAIRNESS,), label_values)  # client-chosen: bounded too
        self.activity = Activity()  # the last decisions and the pods' reported cache hits (the dashboard)
        self.loop_collectors: list[Collector] = [PoolCollector(store, pool_name)]
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        # Legacy names (the Inference Extension's) and the reference's llm_d_epp_* names, side by
        # side with the reference's labels, as the reference emits them. The series updated per
        # request or per chunk are loop-owned (no lock per update; see loopmetrics).
        full = ["model_name", "target_model_name", "fairness_id", "priority"]
        # The llm_d_epp_* request series are updated per request; their legacy names
        # (inference_objective_*) are summed from them at scrape time (LegacyRequestSeries), so
        # a request costs one update per series, not two.
        self.llmd_requests = LoopCounter("llm_d_epp_request", "Total number of processed requests.", full, registry=r)
        self.llmd_errors = LoopCounter("llm_d_epp_request_error", "Total number of request errors.",
                                       [*full, "error_code"],
                                       registry=r)
        self.llmd_duration = LoopHistogram("llm_d_epp_request_duration_seconds",
                                           "End-to-end request latency distribution in seconds.", full,
                                           buckets=REQUEST_BUCKETS, registry=r)
        self.llmd_running = LoopGauge("llm_d_epp_request_running", "Current number of active running requests.", full,
                                      registry=r)
        # What the responses tell (sizes, tokens, TTFT, time per output token), per request.
        self.llmd_request_sizes = LoopHistogram("llm_d_epp_request_size_bytes",
                                                "Incoming request body size distribution in bytes.", full,
                                                buckets=SIZE_BUCKETS, registry=r)
        self.llmd_response_sizes = LoopHistogram("llm_d_epp_response_size_bytes",
                                                 "Outgoing response body size distribution in bytes.", full,
                                                 buckets=RESPONSE_SIZE_BUCKETS, registry=r)
        self.llmd_input_tokens = LoopHistogram("llm_d_epp_request_input_tokens",
                                               "Input token count distribution per request.", full,
                                               buckets=TOKEN_BUCKETS, registry=r)
        self.llmd_output_tokens = LoopHistogram("llm_d_epp_request_output_tokens",
                                                "Output token count distribution per request.", full,
                                                buckets=OUTPUT_TOKEN_BUCKETS, registry=r)
        self.llmd_cached_tokens = LoopHistogram("llm_d_epp_request_cached_tokens",
                                                "Distribution of prompt tokens read from cache per request, as "
                                                "reported by the model server in the response.", full,
                                                buckets=TOKEN_BUCKETS, registry=r)
        self.llmd_ntpot = LoopHistogram("llm_d_epp_request_ntpot_seconds",
                                        "Normalized time per output token in seconds (end-to-end latency divided by "
                                        "output token count).", full, buckets=NTPOT_BUCKETS, registry=r)
        self.llmd_ttft = LoopHistogram("llm_d_epp_request_ttft_seconds",
                                       "Time to first token in seconds, measured from request received to first "
                                       "response byte. For non-streaming requests, this equals total request "
                                       "duration.",
                                       [*full, "streaming"], buckets=REQUEST_BUCKETS, registry=r)
        self.llmd_tpot = LoopHistogram("llm_d_epp_request_streaming_tpot_seconds",
                                       "Average time per output token in seconds for streaming requests, computed as "
                                       "(e2e - TTFT) / (output_tokens - 1).", full, buckets=TPOT_BUCKETS, registry=r)
        self.llmd_itl = LoopHistogram("llm_d_epp_request_streaming_itl_seconds",
                                      "Inter-token latency in seconds for streaming requests, measured as the time "
                                      "between consecutive response body chunks.", full, buckets=ITL_BUCKETS,
                                      registry=r)
        self.loop_collectors.append(LegacyRequestSeries(self))
        endpoint = ["endpoint_name", "namespace", "port"]
        self.scheduler_attempts = LoopCounter("inference_extension_scheduler_attempts",
                                              "Total number of scheduling attempts.",
                                              ["status", "target_model_name", "pod_name", "namespace", "port"],
                                              registry=r)
        self.llmd_scheduler_attempts = LoopCounter("llm_d_epp_scheduler_attempts",
                                                   "Total number of scheduling attempts.",
                                                   ["status", "target_model_name", *endpoint], registry=r)
        self.request_processing = LoopHistogram("llm_d_epp_request_processing_duration_seconds",
                                                "EPP request processing latency distribution in seconds, from request "
                                                "receipt until the request body has been handled, including admission "
                                                "control.", buckets=REQUEST_PROCESSING_BUCKETS, registry=r)
        self.response_processing = LoopHistogram("llm_d_epp_response_processing_duration_seconds",
                                                 "EPP response processing latency distribution in seconds: the sum of "
                                                 "per-chunk handler time for a streamed response, or the interval from "
                                                 "response headers to completion for a non-streaming response.",
                                                 buckets=RESPONSE_PROCESSING_BUCKETS, registry=r)
        info = ["commit", "build_ref"]
        for name in ("inference_extension_info", "llm_d_epp_info"):
            Gauge(name, "General information of the current build of Inference Extension.", info,
                  registry=r).labels(*build_info()).set(1)
        rewrite = ["model_rewrite_name", "model_name", "target_model"]
        self.rewrite_decisions = Counter("inference_extension_model_rewrite_decisions",
                                         "Total number of inference model rewrite decisions.", rewrite, registry=r)
        self.llmd_rewrite_decisions = Counter("llm_d_epp_model_rewrite_decisions",
                                              "Total number of inference model rewrite decisions.", rewrite,
                                              registry=r)
        self.poll_errors = Counter("llm_d_epp_datalayer_poll_errors", "Data-source poll errors per source type.",
                                   ["source_type"], registry=r)
        self.legacy_poll_errors = Counter("llm_d_inference_scheduler_datalayer_poll_errors",
                                          "Data-source poll errors per source type.", ["source_type"], registry=r)
        self.extract_errors = Counter("llm_d_epp_datalayer_extract_errors", "Extract errors per source/extractor type.",
                                      ["source_type", "extractor_type"], registry=r)
        self.legacy_extract_errors = Counter("llm_d_inference_scheduler_datalayer_extract_errors",
                                             "Extract errors per source/extractor type.",
                                             ["source_type", "extractor_type"], registry=r)
        self.scheduler_e2e = LoopHistogram("inference_extension_scheduler_e2e_duration_seconds",
                                           "Scheduling latency per request.", buckets=LATENCY_BUCKETS, registry=r)
        self.llmd_scheduler_e2e = LoopHistogram("llm_d_epp_scheduler_e2e_duration_seconds",
                                                "End-to-end scheduling latency distribution in seconds.",
                                                buckets=SCHEDULER_BUCKETS, registry=r)
        plugin = ["extension_point", "plugin_type", "plugin_name"]
        self.plugin_duration = LoopHistogram("inference_extension_plugin_duration_seconds",
                                             "Latency of each plugin per call.", plugin, buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.llmd_plugin_duration = LoopHistogram("llm_d_epp_plugin_duration_seconds",
                                                  "Plugin processing latency distribution in seconds for each "
                                                  "extension point, plugin type and plugin name.", plugin,
                                                  buckets=SCHEDULER_BUCKETS, registry=r)
        self.picks = LoopCounter("epp_picks", "Picks per endpoint.", ["endpoint"], registry=r)
        self.scrape_errors = Counter("epp_metrics_scrape_errors", "Failed metric scrapes.", ["endpoint", "reason"],
                                     registry=r)
        self.scrape_parse = Histogram("epp_metrics_scrape_parse_seconds", "Time to parse one /metrics exposition.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.rewrites = Counter("epp_model_rewrites", "Requests whose model an InferenceModelRewrite changed.",
                                ["model_name", "target_model_name"], registry=r)
        self.config_reloads = Counter("epp_config_reloads", "Config reloads applied.", registry=r)
        ProcessCollector(registry=r)

        self.child = Children()
        self._per_request: dict[RequestLabels, tuple[Any, Any, Any]] = {}

    def prepare(self) -> Collector:
        """Everything to render: the registry plus the loop collectors' families, read now."""
        families = [m for c in self.loop_collectors for m in c.collect()]
        return _Joined(self.registry, Frozen(families))

    def scrape_failed(self, endpoint: str, kind: str) -> None:
        """A pod's /metrics could not be read (poll) or parsed (extract)."""
        self.child(self.scrape_errors, endpoint, kind).inc()
        if kind in EXTRACT_ERRORS:
            for c in (self.extract_errors, self.legacy_extract_errors):
                self.child(c, "metrics-data-source", "core-metrics-extractor").inc()
        else:
            for c in (self.poll_errors, self.legacy_poll_errors):
                self.child(c, "metrics-data-source").inc()

    def attribute_poll_failed(self, endpoint: str, extracting: bool) -> None:
        """The DCGM exposition of ``endpoint`` could not be read (poll) or parsed (extract)."""
        if extracting:
            for c in (self.extract_errors, self.legacy_extract_errors):
                self.child(c, "dcgm-data-source", "dcgm-extractor").inc()
        else:
            for c in (self.poll_errors, self.legacy_poll_errors):
                self.child(c, "dcgm-data-source").inc()

    def scheduling_attempt(self, ok: bool, target_model: str, endpoint: str, name: str = "") -> None:
        """One scheduling cycle: ``endpoint`` (host:port; ``name`` its namespace/name when
        discovered) chosen, or none (a failure)."""
        host, _, port = endpoint.rpartition(":") if endpoint else ("", "", "")
        namespace, _, pod = name.rpartition("/") if name else ("", "", host)
        status, target = ("success" if ok else "failure"), self.models(target_model)
        self.child(self.scheduler_attempts, status, target, pod, namespace, port).inc()
        self.child(self.llmd_scheduler_attempts, status, target, pod, namespace, port).inc()

    def rewrite_decided(self, rule: str, model: str, target: str) -> None:
        models = self.models
        self.child(self.rewrites, models(model), models(target)).inc()
        for c in (self.rewrite_decisions, self.llmd_rewrite_decisions):
            self.child(c, rule, models(model), models(target)).inc()

    def response_observed(self, lab: RequestLabels, r: ResponseFacts) -> None:
        """One response's facts at its end (the series it has data for)."""
        c = self.child
        if r.request_bytes is not None:
            c(self.llmd_request_sizes, *lab).observe(r.request_bytes)
        if r.response_bytes is not None:
            c(self.llmd_response_sizes, *lab).observe(r.response_bytes)
        if r.ttft is not None:
            c(self.llmd_ttft, *lab, "true" if r.streamed else "false").observe(r.ttft)
        if r.prompt_tokens:
            c(self.llmd_input_tokens, *lab).observe(r.prompt_tokens)
        if r.cached_tokens is not None:
            c(self.llmd_cached_tokens, *lab).observe(r.cached_tokens)
        out = r.completion_tokens
        if out:
            c(self.llmd_output_tokens, *lab).observe(out)
            c(self.llmd_ntpot, *lab).observe(r.e2e / out)
            if r.streamed and r.ttft is not None and out > 1:
                c(self.llmd_tpot, *lab).observe(max(0.0, r.e2e - r.ttft) / (out - 1))
        if r.processing is not None:
            self.response_processing.observe(r.processing)

    def plugin_timer(self, extension_point: str, plugin_type: str, name: str, seconds: float) -> None:
        self.child(self.plugin_duration, extension_point, plugin_type, name).observe(seconds)
        self.child(self.llmd_plugin_duration, extension_point, plugin_type, name).observe(seconds)

    # -- one request's life (the director reports; the labels are bounded here) ------------------
    def request_labels(self, model: str, target: str, fairness: str, priority: int) -> RequestLabels:
        return RequestLabels(self.models(model), self.models(target), self.fairness(fairness or DEFAULT_FAIRNESS),
                             str(priority))

    def _of(self, lab: RequestLabels) -> tuple[Any, Any, Any]:
        """The (counter, running gauge, duration histogram) children of one label set, cached."""
        found = self._per_request.get(lab)
        if found is None:
            found = self._per_request[lab] = (self.llmd_requests.labels(*lab), self.llmd_running.labels(*lab),
                                              self.llmd_duration.labels(*lab))
        return found

    def request_started(self, lab: RequestLabels) -> None:
        self._of(lab)[0].inc()

    def request_refused(self, lab: RequestLabels, status: int) -> None:
        self.child(self.llmd_errors, *lab, str(status)).inc()

    def scheduled(self, seconds: float) -> None:
        self.scheduler_e2e.observe(seconds)
        self.llmd_scheduler_e2e.observe(seconds)

    def request_running(self, lab: RequestLabels, delta: int) -> None:
        if lab.model:  # as the reference: only requests that name a model
            self._of(lab)[1].inc(delta)

    def request_finished(self, lab: RequestLabels, seconds: float) -> None:
        children = self._of(lab)
        children[2].observe(seconds)
        if lab.model:
            children[1].dec()

    def sample_value(self, name: str, labels: dict[str, str]) -> float | None:
        """One sample of the exposition, legacy series included (for tests and debugging)."""
        for family in self.prepare().collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None


# Legacy family -> (the llm_d_epp_* family it sums, its labels, kind, help).
_LEGACY: tuple[tuple[str, str, tuple[str, ...], str, str], ...] = (
    ("inference_objective_request", "llm_d_epp_request", ("model_name", "target_model_name", "priority"),
     "counter", "Requests received, by model."),
    ("inference_objective_request_error", "llm_d_epp_request_error",
     ("model_name", "target_model_name", "error_code"), "counter", "Requests refused or failed, by error code."),
    ("inference_objective_request_duration_seconds", "llm_d_epp_request_duration_seconds",
     ("model_name", "target_model_name"), "histogram", "Time from the pick to the end of the response."),
    ("inference_objective_running_requests", "llm_d_epp_request_running", ("model_name",), "gauge",
     "Requests routed and not ended, by model."),
    ("inference_objective_request_sizes", "llm_d_epp_request_size_bytes", ("model_name", "target_model_name"),
     "histogram", "Incoming request body size distribution in bytes."),
    ("inference_objective_response_sizes", "llm_d_epp_response_size_bytes", ("model_name", "target_model_name"),
     "histogram", "Outgoing response body size distribution in bytes."),
    ("inference_objective_input_tokens", "llm_d_epp_request_input_tokens", ("model_name", "target_model_name"),
     "histogram", "Input token count distribution per request."),
    ("inference_objective_output_tokens", "llm_d_epp_request_output_tokens", ("model_name", "target_model_name"),
     "histogram", "Output token count distribution per request."),
    ("inference_objective_prompt_cached_tokens", "llm_d_epp_request_cached_tokens",
     ("model_name", "target_model_name"), "histogram", "Prompt tokens read from cache per request."),
    ("inference_objective_normalized_time_per_output_token_seconds", "llm_d_epp_request_ntpot_seconds",
     ("model_name", "target_model_name"), "histogram", "End-to-end latency divided by output tokens."),
)
EXTRACT_ERRORS = frozenset({"ParseError", "ValueRejected", "TooLarge"})  # the exposition came, unreadable


@dataclass(slots=True)
class ResponseFacts:
    """What a request's response told, for the response series (None: not seen)."""

    e2e: float  # seconds from the request's arrival to the response's end
    streamed: bool
    request_bytes: int | None = None
    response_bytes: int | None = None
    ttft: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None
    processing: float | None = None


def build_info() -> tuple[str, str]:
    """(commit, build_ref) for the info series: the package's version; the commit when the
    build recorded one (EPP_BUILD_COMMIT), else "unknown"."""
    import os
    from importlib import metadata

    try:
        version = metadata.version("epp")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return os.environ.get("EPP_BUILD_COMMIT", "unknown"), version


class LegacyRequestSeries(Collector):
    """The Inference Extension's request series, summed from the llm_d_epp_* ones over the
    labels they lack (fairness_id, and priority where the legacy series has none)."""

    def __init__(self, metrics: PickerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        sources = {f.name: f for metric in (m.llmd_requests, m.llmd_errors, m.llmd_duration, m.llmd_running,
                                            m.llmd_request_sizes, m.llmd_response_sizes, m.llmd_input_tokens,
                                            m.llmd_output_tokens, m.llmd_cached_tokens, m.llmd_ntpot)
                   for f in metric.collect()}
        for legacy, source, keep, kind, help_text in _LEGACY:
            family = sources.get(source)
            sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for sample in family.samples if family is not None else ():
                if sample.name.endswith("_created"):
                    continue
                suffix = sample.name[len(source):]
                extra = (("le", sample.labels["le"]),) if "le" in sample.labels else ()
                key = (suffix, tuple((k, sample.labels.get(k, "")) for k in keep) + extra)
                sums[key] = sums.get(key, 0.0) + sample.value
            out = Metric(legacy, help_text, kind)
            for (suffix, labels), value in sums.items():
                out.add_sample(legacy + suffix, dict(labels), value)
            yield out


class RequestLabels(NamedTuple):
    model: str
    target: str
    fairness: str
    priority: str
