"""InferenceModelRewrite through a real Envoy: the body reaching the pod carries the rewritten
model (re-serialised, its length consistent) in FULL_DUPLEX_STREAMED and BUFFERED modes, with
the configured weights."""

from __future__ import annotations

from collections import Counter

import aiohttp
import orjson
import pytest

from epp.sim.profiles import profile
from epp.stack.local import in_process_stack

from .conftest import post

REWRITE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: food-canary, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  poolRef: {name: default}
  rules:
  - matches: [{model: {type: Exact, value: food}}]
    targets:
    - {modelRewrite: food-v1, weight: 80}
    - {modelRewrite: food-v2, weight: 20}
"""
MODELS = profile("fast").with_overrides(served_model_names=("sim-model", "food-v1", "food-v2"))


@pytest.mark.parametrize(("template", "n"), [("epp-full-duplex", 300), ("epp-buffered", 40)])
async def test_rewrites_reach_the_pod_with_their_weights(template: str, n: int) -> None:
    async with in_process_stack(servers=2, params=MODELS, template=template, objectives_text=REWRITE) as stack, \
            aiohttp.ClientSession() as s:
        seen: Counter[str] = Counter()
        for i in range(n):
            body = orjson.dumps({"model": "food", "prompt": f"a recipe {i} " + "x" * (i * 37 % 3000),
                                 "max_tokens": 2, "ignore_eos": True})
            status, _, data = await post(s, f"{stack.url}/v1/completions", body,
                                         headers={"content-type": "application/json"})
            assert status == 200, data
            seen[orjson.loads(data)["model"]] += 1
        assert set(seen) <= {"food-v1", "food-v2"} and sum(seen.values()) == n
        if n >= 300:
            assert 0.12 < seen["food-v2"] / n < 0.28, seen
        # Other models pass untouched.
        status, _, data = await post(s, f"{stack.url}/v1/completions",
                                     orjson.dumps({"model": "sim-model", "prompt": "hi", "max_tokens": 1}))
        assert status == 200 and orjson.loads(data)["model"] == "sim-model"
        assert stack.picker is not None
        text = stack.picker.metrics.registry.get_sample_value(
            "epp_model_rewrites_total", {"model_name": "food", "target_model_name": "food-v2"})
        assert text == seen["food-v2"]


async def test_the_pick_api_tells_non_envoy_gateways_the_rewritten_model_and_priority() -> None:
    import grpc

    from epp.v1 import picker_pb2, picker_pb2_grpc

    policies = REWRITE + """---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -3, poolRef: {name: default}}
"""
    async with in_process_stack(servers=2, params=MODELS, objectives_text=policies) as stack:
        assert stack.picker is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.picker.bound_ports['grpc']}") as ch:
            stub = picker_pb2_grpc.EndpointPickerStub(ch)
            targets = set()
            for i in range(40):
                resp = await stub.Pick(picker_pb2.PickRequest(model="food", prompt=f"p {i}",
                                                              headers={"x-gateway-inference-objective": "batch"}))
                targets.add(resp.target_model)
                assert resp.priority == -3
                assert (await stub.Release(picker_pb2.ReleaseRequest(pick_id=resp.pick_id))).released
            assert targets == {"food-v1", "food-v2"}
            plain = await stub.Pick(picker_pb2.PickRequest(model="sim-model", prompt="x"))
            assert plain.target_model == "sim-model" and plain.priority == 0
