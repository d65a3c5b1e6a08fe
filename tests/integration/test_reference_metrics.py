"""epp's /metrics against the reference's metric names (tests/fixtures/reference/metrics.txt, taken
from its source): every name is exposed, except the in-flight eviction series (a feature epp
refuses in config) and the data-scope violations (epp has no data scopes); and the response
series carry what the responses said."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from epp.sim.profiles import profile
from epp.stack.local import in_process_stack

from .conftest import post

REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "metrics.txt"
NOT_EXPORTED = {
    "llm_d_epp_plugin_data_scope_violations_total",  # epp's plugins have no data scopes to violate
}
CONFIG = """apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}, {pluginRef: prefix-cache-scorer}, {pluginRef: max-score-picker}]
flowControl:
  maxRequests: 100
  maxBytes: 10000000
"""
REWRITE = """\
apiVersion: llm-d.ai/v1alpha2
kind: InferenceModelRewrite
metadata: {name: food-canary, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  poolRef: {group: llm-d.ai, kind: InferencePool, name: default}
  rules:
  - matches: [{model: {type: Exact, value: food}}]
    targets: [{modelRewrite: sim-model, weight: 1}]
"""


def names_in(text: str) -> set[str]:
    out = set()
    for fam in text_string_to_metric_families(text):
        out.add(fam.name)
        out.add(fam.name + ("_total" if fam.type == "counter" else ""))
    return out


async def test_every_reference_metric_name_is_exposed_and_the_response_series_fill() -> None:
    wanted = [line.strip() for line in REFERENCE.read_text().splitlines() if line.strip() and line[0] != "#"]
    params = profile("fast").with_overrides(served_model_names=("sim-model",))
    async with in_process_stack(servers=2, params=params, config_text=CONFIG, objectives_text=REWRITE) as stack, \
            aiohttp.ClientSession() as s:
        for a in stack.addresses:  # tokens 10 ms apart: each its own chunk through Envoy
            await stack.server(a).apply_admin({"step_latency_ms": 10})
        for stream in (False, True, True):
            body = orjson.dumps({"model": "food", "max_tokens": 6, "ignore_eos": True, "stream": stream,
                                 "stream_options": {"include_usage": True} if stream else None,
                                 "messages": [{"role": "user", "content": "tell me about trains " * 40}]})
            status, _, _ = await post(s, f"{stack.url}/v1/chat/completions", body)
            assert status == 200
        assert stack.picker is not None
        async with s.get(f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}/metrics") as r:
            text = await r.text()
    exposed = names_in(text)
    missing = [n for n in wanted if n not in exposed and n not in NOT_EXPORTED]
    assert not missing, missing
    samples = {(sm.name, tuple(sorted(sm.labels.items()))): sm.value
               for fam in text_string_to_metric_families(text) for sm in fam.samples}

    def value(name: str, **labels: str) -> float:
        found = [v for (n, lab), v in samples.items() if n == name and all(dict(lab).get(k) == x
                                                                           for k, x in labels.items())]
        assert found, (name, labels)
        return sum(found)

    base = {"model_name": "food", "target_model_name": "sim-model"}
    assert value("llm_d_epp_request_output_tokens_count", **base) == 3
    assert value("llm_d_epp_request_output_tokens_sum", **base) == 18
    assert value("inference_objective_output_tokens_sum", **base) == 18  # the legacy name, summed
    assert value("llm_d_epp_request_input_tokens_count", **base) == 3
    assert value("llm_d_epp_request_ttft_seconds_count", streaming="true", **base) == 2
    assert value("llm_d_epp_request_ttft_seconds_count", streaming="false", **base) == 1
    assert value("llm_d_epp_request_streaming_tpot_seconds_count", **base) == 2
    assert value("llm_d_epp_request_streaming_itl_seconds_count", **base) >= 2 * 5  # 6 tokens: >= 5 gaps each
    assert value("llm_d_epp_request_size_bytes_count", **base) == 3
    assert value("llm_d_epp_response_size_bytes_sum", **base) > 0
    assert value("llm_d_epp_request_ntpot_seconds_count", **base) == 3
    assert value("llm_d_epp_request_cached_tokens_count", **base) == 3
    assert value("llm_d_epp_scheduler_attempts_total", status="success", target_model_name="sim-model") == 3
    assert value("inference_extension_scheduler_attempts_total", status="success") == 3
    assert value("llm_d_epp_model_rewrite_decisions_total", model_rewrite_name="food-canary", model_name="food",
                 target_model="sim-model") == 3
    assert value("llm_d_epp_request_processing_duration_seconds_count") == 3
    assert value("llm_d_epp_response_processing_duration_seconds_count") == 3
    assert value("llm_d_epp_info") == 1
    assert value("llm_d_epp_prefix_indexer_hit_ratio_count", plugin_type="approx-prefix-cache-producer") == 3
    assert value("inference_extension_prefix_indexer_hit_bytes_sum") > 0  # the second and third matched the first
    assert value("llm_d_epp_prefix_indexer_size", plugin_name="approx-prefix-cache-producer") > 0
    assert value("llm_d_epp_per_endpoint_queue_size", model_server_endpoint=stack.addresses[0]) >= 0
