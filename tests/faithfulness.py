"""Checks of the simulator against a real vLLM's /metrics and KV events.

Used by the default suite (against the committed recording) and the real-vLLM suite (against a
live server).
"""

from __future__ import annotations

import re
from typing import Any

from epp.sim.metrics import PINNABLE

# The series the simulator claims to reproduce.
CLAIMED = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
           "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
           "vllm:cache_config_info", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
           "vllm:request_success_total", "vllm:time_to_first_token_seconds_bucket",
           "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
           "vllm:request_queue_time_seconds_bucket")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", re.M)


def series(text: str) -> dict[str, set[str]]:
    """metric name -> label names seen."""
    out: dict[str, set[str]] = {}
    for name, labels in _SAMPLE.findall(text):
        keys = {kv.split("=")[0] for kv in re.findall(r'(\w+)="', labels)}
        out.setdefault(name, set()).update(keys)
    return out


def types(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def check_metrics(real_text: str, sim_text: str) -> None:
    real, sim = series(real_text), series(sim_text)
    real_types, sim_types = types(real_text), types(sim_text)
    for name in CLAIMED:
        assert name in real, f"{name} not in the real vLLM exposition"
        assert name in sim, f"{name} missing from the simulator"
        assert real[name] <= sim[name], f"{name}: real labels {real[name]} vs sim {sim[name]}"
        family = name.removesuffix("_total").removesuffix("_bucket")
        if family in real_types:
            assert sim_types.get(family) == real_types[family], family
    for pinned in PINNABLE.values():
        assert pinned in real


def check_kv_frames(frames: list[dict[str, Any]], sim_stored: dict[str, Any] | None = None) -> None:
    """Framing facts of a real vLLM's KV events (and, given one, a simulator BlockStored's keys)."""
    assert frames, "no KV event frames"
    assert all(f["topic"] == "kv-events" for f in frames)
    assert [f["seq"] for f in frames] == list(range(len(frames)))
    for f in frames:
        ts, events, rank = f["batch"]
        assert isinstance(ts, float) and isinstance(events, list) and rank == 0
    kinds = {e["type"] for f in frames for e in f["batch"][1]}
    assert {"BlockStored", "BlockRemoved", "AllBlocksCleared"} <= kinds
    removed = [e for f in frames for e in f["batch"][1] if e["type"] == "BlockRemoved"]
    assert all(len(e["block_hashes"]) == 1 for e in removed)  # one event per evicted block
    assert list(removed[0]) == ["type", "block_hashes", "medium", "group_idx"]
    if sim_stored is not None:
        real = next(e for f in frames for e in f["batch"][1] if e["type"] == "BlockStored")
        assert list(sim_stored) == list(real)
