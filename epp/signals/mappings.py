"""Metric names per serving engine (the engine is a config choice)."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class MetricNames:
    waiting: str
    running: str
    kv_usage: str
    prefix_queries: str | None = None
    prefix_hits: str | None = None
    cache_info: str | None = None
    lora_info: str | None = None
    kv_usage_is_percent: bool = False  # value in 0..100 rather than 0..1


VLLM = MetricNames(
    waiting="vllm:num_requests_waiting",
    running="vllm:num_requests_running",
    kv_usage="vllm:kv_cache_usage_perc",
    prefix_queries="vllm:prefix_cache_queries_total",
    prefix_hits="vllm:prefix_cache_hits_total",
    cache_info="vllm:cache_config_info",
    lora_info="vllm:lora_requests_info",
)

SGLANG = MetricNames(
    waiting="sglang:num_queue_reqs",
    running="sglang:num_running_reqs",
    kv_usage="sglang:token_usage",
    prefix_hits=None,
    cache_info=None,
)

ENGINES = MappingProxyType({"vllm": VLLM, "sglang": SGLANG})


def names_for(engine: str) -> MetricNames:
    try:
        return ENGINES[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}") from None
