"""/metrics for one simulated engine, with vLLM 0.32's names, labels and semantics.

``EngineMetrics.render`` writes the exposition with string templates: prometheus_client's
``generate_latest`` took ~1.2 ms per scrape here, and in the benchmarks the fleet shares one
process (and one core) with the load generator, so a picker scraping 8 servers every 50 ms
cost the simulated GPUs ~20 % of that core. The registry stays as the reference: a unit test
checks that both give the same samples.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _untyped_go

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from epp.sim.engine import Engine

# vLLM's bucket boundaries.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)

# Short names an admin pin may override -> full metric name.
PINNABLE = {
    "num_requests_running": "vllm:num_requests_running",
    "num_requests_waiting": "vllm:num_requests_waiting",
    "kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
}


def cache_config_labels(block_size: int, num_gpu_blocks: int, prefix_caching: bool, engine: str) -> dict[str, str]:
    """vLLM 0.32's cache_config_info label set (values of a plain full-attention model)."""
    return {
        "_block_size_resolved": "True", "block_size": str(block_size), "cache_dtype": "auto",
        "cache_hit_alignment_tokens": "None", "effective_attention_block_size": str(block_size),
        "enable_mamba_shared_prefix_checkpoint": "False", "enable_prefix_caching": str(prefix_caching),
        "engine": engine, "gpu_memory_utilization": "0.9", "hash_block_size": "None", "is_attention_free": "False",
        "kv_cache_dtype_skip_layers": "[]", "kv_cache_layout": "None", "kv_cache_max_concurrency": "None",
        "kv_cache_memory_bytes": "None", "kv_cache_size_tokens": str(block_size * num_gpu_blocks),
        "kv_offloading_backend": "native", "kv_offloading_size": "None", "kv_sharing_fast_prefill": "False",
        "mamba_block_size": "None", "mamba_cache_dtype": "auto", "mamba_cache_mode": "none",
        "mamba_page_size_padded": "None", "mamba_ssm_cache_dtype": "auto", "num_cpu_blocks": "None",
        "num_gpu_blocks": str(num_gpu_blocks), "num_gpu_blocks_override": "None",
        "prefix_cache_retention_interval": "0", "prefix_caching_hash_algo": "sha256", "prefix_match_unit": "None",
        "replayssm_buffer_len": "16", "skip_page_size_padded": "None", "sliding_window": "None",
        "swa_bounded_replay": "True", "use_kda_recoverssm": "False", "use_replayssm": "False",
        "user_specified_block_size": "True",
    }


# The engine's gauges and counters: (name without "vllm:" and "_total", help text, reader). Both
# renderings (the registry's collector and ``EngineMetrics.render``) are built from these.
GAUGES: tuple[tuple[str, str, Callable[[Engine], float]], ...] = (
    ("num_requests_running", "Number of requests in model execution batches.", lambda e: len(e.running)),
    ("num_requests_waiting", "Number of requests waiting to be processed.", lambda e: len(e.waiting)),
    ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lambda e: e.kv.usage()),
)
COUNTERS: tuple[tuple[str, str, Callable[[Engine], float]], ...] = (
    ("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
     lambda e: e.stats.prefix_queries),
    ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", lambda e: e.stats.prefix_hits),
    ("num_preemptions", "Cumulative number of preemption from the engine.", lambda e: e.stats.preemptions),
    ("prompt_tokens", "Number of prefill tokens processed.", lambda e: e.stats.prompt_tokens),
    ("generation_tokens", "Number of generation tokens processed.", lambda e: e.stats.generation_tokens),
)
SUCCESS_DOC = "Count of successfully processed requests."


class EngineCollector(Collector):
    """Reads gauges and counters from the engine at scrape time (nothing on the hot path)."""

    def __init__(self, engine: Engine, engine_label: str, model_name: str, pins: dict[str, float]) -> None:
        self.engine = engine
        self.labels = [engine_label, model_name]
        self.pins = pins

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        for name, doc, read in GAUGES:
            g = GaugeMetricFamily(f"vllm:{name}", doc, labels=["engine", "model_name"])
            g.add_metric(self.labels, self.pins.get(name, read(e)))
            yield g
        for name, doc, read in COUNTERS:
            c = CounterMetricFamily(f"vllm:{name}", doc, labels=["engine", "model_name"])
            c.add_metric(self.labels, read(e))
            yield c
        ok = CounterMetricFamily("vllm:request_success", SUCCESS_DOC,
                                 labels=["engine", "finished_reason", "model_name"])
        for reason, n in sorted(e.stats.finished.items()):
            ok.add_metric([self.labels[0], reason, self.labels[1]], n)
        yield ok
        yield self.cache_info()
        lora = self.lora_info()
        if lora is not None:
            yield lora

    def cache_info(self) -> GaugeMetricFamily:
        p = self.engine.params
        cache_labels = cache_config_labels(p.block_size, p.num_gpu_blocks, p.enable_prefix_caching, self.labels[0])
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=list(cache_labels))
        info.add_metric(list(cache_labels.values()), 1.0)
        return info

    def lora_info(self) -> GaugeMetricFamily | None:
        e = self.engine
        if not e.params.lora_adapters:
            return None
        running = sorted({r.lora_name for r in e.running if r.lora_name})
        waiting = sorted({r.lora_name for r in e.waiting if r.lora_name})
        lora = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        lora.add_metric([str(e.params.max_lora), ",".join(running), ",".join(waiting)], time.time())
        return lora


def _go(value: float) -> str:
    """A sample value as prometheus_client writes it."""
    text: str = _untyped_go(value)  # type: ignore[no-untyped-call]
    return text


class _FastHistogram:
    """A histogram's counts, rendered as prometheus_client renders one labelled child."""

    __slots__ = ("bounds", "counts", "created", "name", "sum", "text_bounds", "total")

    def __init__(self, name: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.bounds = bounds
        self.text_bounds = [_go(b) for b in bounds] + ["+Inf"]
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.total = 0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.total += 1

    def render(self, out: list[str], doc: str, engine: str, model: str) -> None:
        n = self.name
        out.append(f"# HELP {n} {doc}\n# TYPE {n} histogram\n")
        cum = 0
        for le, c in zip(self.text_bounds, self.counts, strict=True):
            cum += c
            out.append(f'{n}_bucket{{engine="{engine}",le="{le}",model_name="{model}"}} {_go(float(cum))}\n')
        out.append(f'{n}_count{{engine="{engine}",model_name="{model}"}} {_go(float(self.total))}\n'
                   f'{n}_sum{{engine="{engine}",model_name="{model}"}} {_go(self.sum)}\n'
                   f"# HELP {n}_created {doc}\n# TYPE {n}_created gauge\n"
                   f'{n}_created{{engine="{engine}",model_name="{model}"}} {_go(self.created)}\n')


_HISTOGRAMS = (
    ("ttft", "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS),
    ("itl", "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS),
    ("e2e", "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", E2E_BUCKETS),
    ("queue", "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
     E2E_BUCKETS),
)


class EngineMetrics:
    """One simulated server's metrics: fast histograms plus the engine's gauges and counters, and
    a prometheus_client registry that can hold the same (``mirror_to_reference``, for tests)."""

    def __init__(self, engine_label: str, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.pins: dict[str, float] = {}
        labels = ["engine", "model_name"]
        self._reference: dict[str, Histogram] = {}
        self._fast: dict[str, _FastHistogram] = {}
        for key, name, doc, buckets in _HISTOGRAMS:
            self._reference[key] = Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(
                engine_label, model_name)
            self._fast[key] = _FastHistogram(name, buckets)
        self.engine_label = engine_label
        self.model_name = model_name
        self._collector: EngineCollector | None = None
        self._static: str | None = None
        self._mirror = False

    def observe(self, name: str, value: float) -> None:
        self._fast[name].observe(value)
        if self._mirror:
            self._reference[name].observe(value)

    def mirror_to_reference(self) -> None:
        """Also feed the prometheus_client histograms from now on (tests compare the two)."""
        self._mirror = True

    def attach(self, engine: Engine) -> None:
        self._collector = EngineCollector(engine, self.engine_label, self.model_name, self.pins)
        self.registry.register(self._collector)

    def reference_exposition(self) -> bytes:
        """The same metrics through prometheus_client (tests compare it with ``render``)."""
        out: bytes = generate_latest(self.registry)
        return out

    def render(self) -> bytes:
        engine, model = self.engine_label, self.model_name
        out: list[str] = []
        for key, _, doc, _ in _HISTOGRAMS:
            self._fast[key].render(out, doc, engine, model)
        c = self._collector
        if c is not None:
            e, pins = c.engine, self.pins
            labels = f'{{engine="{engine}",model_name="{model}"}}'
            for name, doc, read in GAUGES:
                out.append(f"# HELP vllm:{name} {doc}\n# TYPE vllm:{name} gauge\nvllm:{name}{labels} "
                           f"{_go(float(pins.get(name, read(e))))}\n")
            for name, doc, read in COUNTERS:
                out.append(f"# HELP vllm:{name}_total {doc}\n# TYPE vllm:{name}_total counter\n"
                           f"vllm:{name}_total{labels} {_go(float(read(e)))}\n")
            out.append(f"# HELP vllm:request_success_total {SUCCESS_DOC}\n"
                       "# TYPE vllm:request_success_total counter\n")
            for reason, n in sorted(e.stats.finished.items()):
                out.append(f'vllm:request_success_total{{engine="{engine}",finished_reason="{reason}",'
                           f'model_name="{model}"}} {_go(float(n))}\n')
            if self._static is None:  # cache_config_info never changes
                self._static = _exposition([c.cache_info()])
            out.append(self._static)
            lora = c.lora_info()
            if lora is not None:
                out.append(_exposition([lora]))
        return "".join(out).encode()


def _exposition(families: list[Metric]) -> str:
    """prometheus_client's text for a few families (the info series, with their many labels)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Fixed(families))
    text: str = generate_latest(reg).decode()
    return text


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
