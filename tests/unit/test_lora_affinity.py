"""LoRA adapters from vLLM's lora_requests_info, and the lora-affinity-scorer that reads them."""

from __future__ import annotations

from epp.config import parse_config
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.signals.mappings import SGLANG, VLLM
from epp.signals.promtext import parse_signals

BASE = ('vllm:num_requests_waiting{model_name="m"} 0\nvllm:num_requests_running{model_name="m"} 2\n'
        'vllm:kv_cache_usage_perc{model_name="m"} 0.1\n')
# vLLM keeps old label sets; the sample's value is when it was made: the latest one counts.
LORA = ('vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 1.7e9\n'
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql-lora, chat-lora",'
        'waiting_lora_adapters="math-lora"} 1.8e9\n')


def test_the_latest_lora_info_sample_gives_the_adapters() -> None:
    s = parse_signals(BASE + LORA, VLLM)
    assert s.active_adapters == {"sql-lora", "chat-lora"} and s.waiting_adapters == {"math-lora"}
    assert s.max_adapters == 2
    bare = parse_signals(BASE, VLLM)  # vLLM emits the series only once an adapter was loaded
    assert (bare.active_adapters, bare.max_adapters) == (frozenset(), 0)
    assert SGLANG.lora_info is None


CONFIG = """apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: lora-affinity-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: lora-affinity-scorer, weight: 1}
"""


def ep(addr: str, active: set[str], waiting: set[str], most: int) -> EndpointState:
    return EndpointState(addr, EngineSignals(active_adapters=frozenset(active), waiting_adapters=frozenset(waiting),
                                             max_adapters=most), scraped_at=1000.0)


def test_lora_affinity_prefers_the_pod_running_the_adapter_then_room_then_waiting() -> None:
    s, _ = parse_config(CONFIG).build()
    pool = Snapshot((ep("running", {"sql-lora"}, set(), 2), ep("room", {"x"}, set(), 4),
                     ep("waiting", {"x", "y"}, {"sql-lora"}, 2), ep("full", {"x", "y"}, set(), 2)), {}, {}, 1000.0, 2.0)
    d = s.schedule(InferenceRequest("id", "/v1/completions", model="sql-lora", prompt="hi"), pool)
    assert {a: v[1]["lora-affinity-scorer"] for a, v in d.scores().items()} == {
        "running": 1.0, "room": 0.8, "waiting": 0.6, "full": 0.0}
    rewritten = InferenceRequest("id", "/v1/completions", model="base", prompt="hi", target_model="sql-lora")
    assert s.schedule(rewritten, pool).primary == "running"  # the target model (after a rewrite) counts
