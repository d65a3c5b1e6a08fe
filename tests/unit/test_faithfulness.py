"""The simulator against the recording of a real vLLM 0.32 (tests/fixtures/vllm-0.32).

The same comparison runs against a live vLLM in the real-vLLM suite (`make test-vllm`).
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp

from epp.sim.metrics import PINNABLE
from epp.sim.profiles import profile
from epp.sim.server import SimServer
from epp.stack.local import free_port

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


async def test_metric_names_labels_and_types_match_real_vllm(vllm_metrics_text: str) -> None:
    server = SimServer(free_port(), profile("fast"))
    await server.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://{server.address}/v1/completions",
                              json={"model": "sim-model", "prompt": "x y z", "max_tokens": 2}) as r:
                await r.read()
            async with s.get(f"http://{server.address}/metrics") as r:
                sim_text = await r.text()
    finally:
        await server.stop()
    real, sim = series(vllm_metrics_text), series(sim_text)
    real_types, sim_types = types(vllm_metrics_text), types(sim_text)
    for name in CLAIMED:
        assert name in real, f"{name} not in the real vLLM recording"
        assert name in sim, f"{name} missing from the simulator"
        # The simulator's labels are a superset-compatible subset: every label the real server
        # puts on the series, the simulator puts there too.
        assert real[name] <= sim[name], f"{name}: real labels {real[name]} vs sim {sim[name]}"
        family = name.removesuffix("_total").removesuffix("_bucket")
        if family in real_types:
            assert sim_types.get(family) == real_types[family], family
    for pinned in PINNABLE.values():
        assert pinned in real


def test_kv_event_batches_are_arrays_of_ts_events_rank(vllm_kv_frames: list[dict[str, Any]]) -> None:
    """What the simulator emits (see test_sim_kvevents) is checked against these facts."""
    assert all(f["topic"] == "kv-events" for f in vllm_kv_frames)
    assert [f["seq"] for f in vllm_kv_frames] == list(range(len(vllm_kv_frames)))
    kinds = {e["type"] for f in vllm_kv_frames for e in f["batch"][1]}
    assert kinds == {"BlockStored", "BlockRemoved", "AllBlocksCleared"}
    removed = [e for f in vllm_kv_frames for e in f["batch"][1] if e["type"] == "BlockRemoved"]
    assert all(len(e["block_hashes"]) == 1 for e in removed)  # one event per evicted block
    assert list(removed[0]) == ["type", "block_hashes", "medium", "group_idx"]
    assert max(h for f in vllm_kv_frames for e in f["batch"][1] for h in e.get("block_hashes", [])) > 2**63
