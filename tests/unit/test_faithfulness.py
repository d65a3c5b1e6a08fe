"""The simulator against the recording of a real vLLM 0.32 (tests/fixtures/vllm-0.32).

The same checks run against a live vLLM in the real-vLLM suite (tests/e2e).
"""

from __future__ import annotations

from typing import Any

import aiohttp

from epp.sim.profiles import profile
from epp.sim.server import SimServer
from epp.stack.local import free_port
from tests.faithfulness import check_kv_frames, check_metrics


async def sim_metrics() -> str:
    server = SimServer(free_port(), profile("fast"))
    await server.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://{server.address}/v1/completions",
                              json={"model": "sim-model", "prompt": "x y z", "max_tokens": 2}) as r:
                await r.read()
            async with s.get(f"http://{server.address}/metrics") as r:
                return await r.text()
    finally:
        await server.stop()


async def test_metric_names_labels_and_types_match_real_vllm(vllm_metrics_text: str) -> None:
    check_metrics(vllm_metrics_text, await sim_metrics())


def test_kv_event_framing_of_the_recording(vllm_kv_frames: list[dict[str, Any]]) -> None:
    check_kv_frames(vllm_kv_frames)
    assert max(h for f in vllm_kv_frames for e in f["batch"][1] for h in e.get("block_hashes", [])) > 2**63
