"""Metric names per serving engine (the engine is a config choice)."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class MetricNames:
    waiting: str
    running: str
    kv_usage: str
    cache_info: str | None = None
    kv_usage_is_percent: bool = False  # value in 0..100 rather than 0..1


VLLM = MetricNames(
    waiting="vllm:num_requests_waiting",
    running="vllm:num_requests_running",
    kv_usage="vllm:kv_cache_usage_perc",
    cache_info="vllm:cache_config_info",
)

SGLANG = MetricNames(
    waiting="sglang:num_queue_reqs",
    running="sglang:num_running_reqs",
    kv_usage="sglang:token_usage",
    cache_info=None,
)

ENGINES = MappingProxyType({"vllm": VLLM, "sglang": SGLANG})


def names_for(engine: str) -> MetricNames:
    try:
        return ENGINES[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}") from None
