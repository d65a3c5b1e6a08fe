"""Through a real Envoy: the burst-prefix-cache-producer places a burst of one prompt's samples
(maxPerReplica caps each pod), and the dcgm-data-source's GPU utilization reaches the filter and
the scorer of a running epp (polled, and dropped when the exporter stops answering)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from epp.stack.local import in_process_stack, wait_until
from tests.exposition_server import exposition_server
from tests.unit.test_burst import burst_config

from .conftest import post

BURST = burst_config(1000, 3)


async def test_a_burst_of_one_prompts_samples_is_placed_together_up_to_the_cap() -> None:
    prompt = "Solve the puzzle and show your steps: a train leaves at nine. " * 10
    body = orjson.dumps({"model": "sim-model", "prompt": prompt, "max_tokens": 2, "n": 1})
    async with in_process_stack(servers=4, config_text=BURST) as stack, aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(post(s, f"{stack.url}/v1/completions", body) for _ in range(6)))
        assert all(status == 200 for status, _, _ in results)
        placed = Counter(headers["x-sim-server"] for _, headers, _ in results)
        assert sorted(placed.values()) == [3, 3]  # one window: 6 samples, 3 per pod, 2 pods


def gpu_config(port: int) -> str:
    return f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {{type: dcgm-data-source, name: dcgm-source, parameters: {{port: {port}, interval: 50ms}}}}
- {{type: dcgm-extractor, name: dcgm-extractor}}
- type: endpoint-attribute-filter
  name: gpu-utilization-filter
  parameters:
    attribute: GPUUtilization
    producer: dcgm-extractor
    onMissing: Fail
    algorithm: {{type: threshold, threshold: {{operator: LessThanOrEqual, value: 0.9}}}}
- type: queue-scorer
- type: max-score-picker
dataLayer:
  sources:
  - pluginRef: dcgm-source
    extractors: [{{pluginRef: dcgm-extractor}}]
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: gpu-utilization-filter}}, {{pluginRef: queue-scorer}}, {{pluginRef: max-score-picker}}]
"""


@pytest.fixture
async def exporter() -> AsyncIterator[tuple[int, list[str]]]:
    """Answers as a DCGM exporter sidecar does (samples without a pod label)."""
    util = ["35"]

    def answer() -> tuple[int, str]:
        if util[0] == "down":
            return 503, ""
        return 200, f'DCGM_FI_DEV_GPU_UTIL{{gpu="0",UUID="GPU-0"}} {util[0]}\n'

    async with exposition_server(answer) as port:
        yield port, util


async def test_gpu_utilization_is_polled_filtered_on_and_dropped_when_the_exporter_fails(
        exporter: tuple[int, list[str]]) -> None:
    port, util = exporter
    chat = orjson.dumps({"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    async with in_process_stack(servers=2, config_text=gpu_config(port)) as stack, aiohttp.ClientSession() as s:
        assert stack.picker is not None
        store = stack.picker.store

        async def polled() -> bool:
            return all(e.attributes.get("GPUUtilization/dcgm-extractor") == 0.35 for e in store.snapshot().endpoints)

        await wait_until(polled, 5, "the GPU utilization of every endpoint")
        status, _, _ = await post(s, f"{stack.url}/v1/chat/completions", chat)
        assert status == 200
        util[0] = "97"  # every GPU busy: the filter (onMissing Fail, no fallback) leaves no endpoint

        async def busy() -> bool:
            return all(e.attributes.get("GPUUtilization/dcgm-extractor") == 0.97 for e in store.snapshot().endpoints)

        await wait_until(busy, 5, "the new utilization")
        status, _, body = await post(s, f"{stack.url}/v1/chat/completions", chat)
        assert status == 503 and "gpu-utilization-filter" in orjson.loads(body)["error"]["message"]
        util[0] = "down"

        async def dropped() -> bool:
            return not any(e.attributes for e in store.snapshot().endpoints)

        await wait_until(dropped, 5, "the attributes to go with the exporter")
        value = stack.picker.metrics.sample_value("llm_d_epp_datalayer_poll_errors_total",
                                                  {"source_type": "dcgm-data-source"})
        assert value is not None and value > 0
