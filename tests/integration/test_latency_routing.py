"""Predicted-latency routing through a real Envoy: epp learns each pod's speed from the responses
it sees (streamed and not) and sends new requests to the pod predicted fastest."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import orjson
import pytest

from epp.sim.profiles import profile
from epp.stack.local import in_process_stack

CONFIG = (Path(__file__).resolve().parents[1] / "fixtures" / "latency-config.yaml").read_text()
FAST = profile("fast").with_overrides(prefill_overhead_s=0.004, decode_base_s=0.002)
SLOW = FAST.with_overrides(prefill_overhead_s=0.06, decode_base_s=0.012)


def body(i: int, stream: bool) -> bytes:
    return orjson.dumps({"model": "sim-model", "prompt": f"question number {i} " * 20, "max_tokens": 6,
                         "stream": stream})


def metric(text: str, name: str, **labels: str) -> list[float]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


@pytest.mark.parametrize("stream", [True, False])
async def test_epp_learns_which_pod_is_slow_and_routes_to_the_fast_one(stream: bool) -> None:
    async with in_process_stack(servers=2, params=[FAST, SLOW], config_text=CONFIG, decision_headers=True) as stack, \
            aiohttp.ClientSession() as s:
        fast, slow = stack.addresses
        served: list[str] = []

        async def one(i: int) -> None:
            async with s.post(f"{stack.url}/v1/completions", data=body(i, stream),
                              headers={"content-type": "application/json"}) as r:
                text = await r.read()
                assert r.status == 200
                served.append(r.headers["x-epp-endpoint"])
            if stream:
                # The client asked for no usage: epp asked the pod for it and cut it out again.
                assert b'"usage"' not in text and text.rstrip().endswith(b"data: [DONE]")

        for i in range(20):
            await one(i)
        await asyncio.gather(*(one(100 + i) for i in range(10)))  # busy: the other pod is worth a try
        for i in range(10):
            await one(200 + i)
        # A pod nobody tried is predicted like those that were, so it gets tried; once its own
        # responses show it slow, idle requests go to the fast one.
        assert slow in served[:30]
        assert served[-10:].count(fast) == 10
        assert stack.picker is not None
        async with s.get(f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}/metrics") as r:
            page = await r.text()
        assert metric(page, "epp_latency_prediction_samples_total") == [40.0]
        step = {a: metric(page, "epp_latency_model_coefficient", endpoint=a, quantity="ttft", feature="step")[0]
                for a in (fast, slow)}
        assert step[slow] > 3 * step[fast]
        factor = {a: metric(page, "epp_latency_model_speed_factor", endpoint=a, quantity="ttft")[0]
                  for a in (fast, slow)}
        assert factor[slow] > 3 * factor[fast]
        assert metric(page, "epp_latency_prediction_active") == [1.0]
        assert re.search(r'epp_latency_prediction_ttft_error_count\{[^}]*\} 40\.0', page)
