"""/metrics for one simulated engine, with vLLM 0.32's names, labels and semantics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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


class EngineCollector(Collector):
    """Reads gauges and counters from the engine at scrape time (nothing on the hot path)."""

    def __init__(self, engine: Engine, engine_label: str, model_name: str, pins: dict[str, float]) -> None:
        self.engine = engine
        self.labels = [engine_label, model_name]
        self.pins = pins

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["engine", "model_name"])
        short = name.removeprefix("vllm:")
        g.add_metric(self.labels, self.pins.get(short, value))
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["engine", "model_name"])
        c.add_metric(self.labels, value)
        return c

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        p = e.params
        s = e.stats
        yield self._gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                          len(e.running))
        yield self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                          len(e.waiting))
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", e.kv.usage())
        yield self._counter("vllm:prefix_cache_queries",
                            "Prefix cache queries, in terms of number of queried tokens.", s.prefix_queries)
        yield self._counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                            s.prefix_hits)
        yield self._counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                            s.preemptions)
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens)
        yield self._counter("vllm:generation_tokens", "Number of generation tokens processed.",
                            s.generation_tokens)
        ok = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                 labels=["engine", "finished_reason", "model_name"])
        for reason, n in sorted(s.finished.items()):
            ok.add_metric([self.labels[0], reason, self.labels[1]], n)
        yield ok
        cache_labels = cache_config_labels(p.block_size, p.num_gpu_blocks, p.enable_prefix_caching, self.labels[0])
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=list(cache_labels))
        info.add_metric(list(cache_labels.values()), 1.0)
        yield info
        if p.lora_adapters:
            running = sorted({r.lora_name for r in e.running if r.lora_name})
            waiting = sorted({r.lora_name for r in e.waiting if r.lora_name})
            lora = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                     labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
            lora.add_metric([str(p.max_lora), ",".join(running), ",".join(waiting)], time.time())
            yield lora


class EngineMetrics:
    """The registry of one simulated server plus its histograms."""

    def __init__(self, engine_label: str, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.pins: dict[str, float] = {}
        labels = ["engine", "model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry).labels(engine_label, model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             labels, buckets=ITL_BUCKETS, registry=self.registry).labels(engine_label, model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             labels, buckets=E2E_BUCKETS, registry=self.registry).labels(engine_label, model_name)
        self.queue = Histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", labels,
                               buckets=E2E_BUCKETS, registry=self.registry).labels(engine_label, model_name)
        self._by_name = {"ttft": self.ttft, "itl": self.itl, "e2e": self.e2e, "queue": self.queue}
        self.engine_label = engine_label
        self.model_name = model_name

    def observe(self, name: str, value: float) -> None:
        self._by_name[name].observe(value)

    def attach(self, engine: Engine) -> None:
        self.registry.register(EngineCollector(engine, self.engine_label, self.model_name, self.pins))
