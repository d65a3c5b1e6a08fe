"""Which series carry the routing signals, per serving engine (the reference's engine configs).

A metric spec is a name with optional label matchers, ``nv_trt_llm_request_metrics{request_type=
waiting}``: only samples with those label values count. Values of all matching samples are summed
(queues; vLLM repeats series per data-parallel ``engine``) or averaged (KV usage).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

_SPEC = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?$")
_MATCHER = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"?([^",]*)"?\s*$')


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MetricSpec:
        """``name`` or ``name{label=value,...}`` (values quoted or not); ValueError otherwise."""
        m = _SPEC.match(text.strip())
        if m is None:
            raise ValueError(f"{text!r} is not a metric spec like name or name{{label=value}}")
        matchers = []
        for part in filter(None, (m.group(2) or "").split(",")):
            lm = _MATCHER.match(part)
            if lm is None:
                raise ValueError(f"{text!r}: {part!r} is not label=value")
            matchers.append((lm.group(1), lm.group(2)))
        return cls(m.group(1), tuple(matchers))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels)


def spec(text: str) -> MetricSpec:
    return MetricSpec.parse(text)


@dataclass(frozen=True, slots=True)
class MetricNames:
    """One engine's series. ``cache_info`` is an info series whose labels carry the block size and
    count; engines without one may give them as plain gauges (``block_size`` / ``num_blocks``)."""

    engine: str
    waiting: MetricSpec
    running: MetricSpec
    kv_usage: MetricSpec | None  # None: the engine reports no KV usage (Triton), read as 0
    cache_info: MetricSpec | None = None
    block_size_label: str = "block_size"
    num_blocks_label: str = "num_gpu_blocks"
    block_size: MetricSpec | None = None
    num_blocks: MetricSpec | None = None
    lora_info: MetricSpec | None = None  # labels running_lora_adapters, waiting_lora_adapters, max_lora


# The reference's built-in engine configs (core-metrics-extractor).
VLLM = MetricNames("vllm", spec("vllm:num_requests_waiting"), spec("vllm:num_requests_running"),
                   spec("vllm:kv_cache_usage_perc"), spec("vllm:cache_config_info"),
                   lora_info=spec("vllm:lora_requests_info"))
SGLANG = MetricNames("sglang", spec("sglang:num_queue_reqs"), spec("sglang:num_running_reqs"),
                     spec("sglang:token_usage"), spec("sglang:cache_config_info"), block_size_label="page_size",
                     num_blocks_label="num_pages")
TRTLLM_SERVE = MetricNames("trtllm-serve", spec("trtllm_num_requests_waiting"), spec("trtllm_num_requests_running"),
                           spec("trtllm_kv_cache_utilization"), block_size=spec("trtllm_kv_cache_tokens_per_block"),
                           num_blocks=spec("trtllm_kv_cache_max_blocks"))
TRITON_TRTLLM = MetricNames(
    "triton-tensorrt-llm", spec("nv_trt_llm_request_metrics{request_type=waiting}"),
    spec("nv_trt_llm_request_metrics{request_type=scheduled}"),
    spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"),
    block_size=spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}"),
    num_blocks=spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}"))
TRITON = MetricNames("triton", spec("nv_inference_pending_request_count"), spec("nv_inference_exec_count"), None)

ENGINES: Mapping[str, MetricNames] = MappingProxyType(
    {e.engine: e for e in (VLLM, SGLANG, TRTLLM_SERVE, TRITON_TRTLLM, TRITON)})

# The pod label naming its engine: the reference's current key, then the older one.
ENGINE_LABEL = "llm-d.ai/engine-type"
LEGACY_ENGINE_LABEL = "inference.networking.k8s.io/engine-type"


def names_for(engine: str) -> MetricNames:
    try:
        return ENGINES[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}") from None


@dataclass(frozen=True, slots=True)
class EngineMapping:
    """Each endpoint's engine, from its pod's label (``label_key``, then the older key), else
    ``default``; an engine the label names but no config knows falls back to ``default`` too."""

    engines: Mapping[str, MetricNames]
    default: str = "vllm"
    label_key: str = ENGINE_LABEL

    def for_labels(self, labels: Mapping[str, str]) -> MetricNames:
        name = labels.get(self.label_key) or labels.get(LEGACY_ENGINE_LABEL) or self.default
        return self.engines.get(name) or self.engines[self.default]


def single_engine(engine: str) -> EngineMapping:
    """Every endpoint runs ``engine`` (the --engine flag), whatever its labels say."""
    return EngineMapping(MappingProxyType({engine: names_for(engine)}), engine, "")
