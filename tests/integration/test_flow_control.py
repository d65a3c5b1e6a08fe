"""Flow control through a real Envoy in front of the simulated fleet: requests wait in epp while
the pool is full and go when capacity frees, by priority and in turn between flows; budgets,
caps, the no-endpoint waiting room, clients that go away, the Pick API, and metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import grpc
import orjson
import pytest

from epp.stack.local import Stack, in_process_stack, wait_until
from epp.v1 import picker_pb2, picker_pb2_grpc

from .conftest import ONE_STREAM_PER_CONNECTION, completion_body, post

CRITICAL = """\
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 10, poolRef: {name: default}}
"""


def flow_config(flow: str = "", max_concurrency: int = 1, fairness: str = "global-strict-fairness-policy") -> str:
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {{maxConcurrency: {max_concurrency}}}
- type: {fairness}
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: concurrency-detector
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
flowControl:
  saturationDetector: {{pluginRef: concurrency-detector}}
  defaultPriorityBand: {{fairnessPolicyRef: {fairness}}}
{flow}"""


async def slow(stack: Stack, step_ms: float) -> None:
    for a in stack.addresses:
        await stack.server(a).apply_admin({"step_latency_ms": step_ms})


def queued(stack: Stack) -> int:
    assert stack.picker is not None and stack.picker.director.waiting is not None
    return stack.picker.director.waiting.controller.queues.totals.count


async def until_queued(stack: Stack, n: int) -> None:
    async def check() -> bool:
        return queued(stack) >= n

    await wait_until(check, 10, f"{n} requests queued in epp")


class Timed:
    """Requests sent concurrently; each one's status, end time, body and headers."""

    def __init__(self, s: aiohttp.ClientSession, url: str) -> None:
        self.s = s
        self.url = url
        self.ends: dict[str, tuple[float, int, dict[str, str], bytes]] = {}

    async def send(self, tag: str, headers: dict[str, str] | None = None, max_tokens: int = 10,
                   stream: bool = False) -> None:
        body = completion_body(f"{tag} " * 20, max_tokens=max_tokens, stream=stream)
        status, h, data = await post(self.s, f"{self.url}/v1/completions", body,
                                     headers={"content-type": "application/json", **(headers or {})})
        self.ends[tag] = (time.monotonic(), status, h, data)

    def order(self) -> list[str]:
        return [t for t, _ in sorted(self.ends.items(), key=lambda kv: kv[1][0])]


@pytest.mark.parametrize("template", ["epp-full-duplex", "epp-buffered"])
async def test_requests_wait_in_epp_and_go_when_capacity_frees(template: str) -> None:
    async with in_process_stack(servers=2, template=template, config_text=flow_config(),
                                decision_headers=True) as stack, aiohttp.ClientSession() as s:
        await slow(stack, 20)  # 10 tokens: ~0.2 s each
        t = Timed(s, stack.url)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, *(len(srv.engine.running) + len(srv.engine.waiting) for srv in stack.fleet.servers))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(t.send(f"r{i}") for i in range(6)))
        watcher.cancel()
        assert [v[1] for v in t.ends.values()] == [200] * 6
        assert peak == 1  # no pod ever had more than one request: the rest waited in epp
        waits = sorted(float(v[2].get("x-epp-queue-ms", "0")) for v in t.ends.values())
        assert waits[-1] > 300  # the last ones waited for two rounds to finish
        assert queued(stack) == 0


async def test_priority_goes_first_and_round_robin_alternates_flows() -> None:
    cfg = flow_config(fairness="round-robin-fairness-policy")
    async with in_process_stack(servers=1, config_text=cfg, objectives_text=CRITICAL) as stack, \
            aiohttp.ClientSession() as s:
        await slow(stack, 20)
        t = Timed(s, stack.url)
        busy = asyncio.create_task(t.send("busy", max_tokens=20))
        await wait_until(lambda: _running(stack), 5, "the pod busy")
        tasks = []
        flow = "x-llm-d-inference-fairness-id"
        for tag, hdrs in [("a0", {flow: "A"}), ("a1", {flow: "A"}), ("a2", {flow: "A"}), ("b0", {flow: "B"}),
                          ("b1", {"x-gateway-inference-fairness-id": "B"}),  # the older header name
                          ("crit", {"x-llm-d-inference-objective": "critical"})]:
            tasks.append(asyncio.create_task(t.send(tag, hdrs, max_tokens=2)))
            await until_queued(stack, len(tasks))
        await asyncio.gather(busy, *tasks)
        assert t.order() == ["busy", "crit", "a0", "b0", "a1", "b1", "a2"]


async def _running(stack: Stack) -> bool:
    return any(srv.engine.running for srv in stack.fleet.servers)


async def test_queue_budget_expiry_is_429_json_with_the_drop_reason() -> None:
    async with in_process_stack(servers=1, config_text=flow_config("  defaultRequestTTL: 300ms")) as stack, \
            aiohttp.ClientSession() as s:
        await slow(stack, 50)
        t = Timed(s, stack.url)
        busy = asyncio.create_task(t.send("busy", max_tokens=30))  # ~1.5 s
        await wait_until(lambda: _running(stack), 5, "the pod busy")
        await t.send("late")
        _, status, headers, data = t.ends["late"]
        assert status == 429 and not busy.done()  # answered by its budget, not after the pod freed
        assert headers["x-llm-d-request-dropped-reason"] == "rejected-ttl-expired"
        assert orjson.loads(data)["error"]["type"] == "RateLimitError"
        await busy
        assert t.ends["busy"][1] == 200


async def test_caps_reject_at_once_and_a_client_that_leaves_is_never_dispatched() -> None:
    async with in_process_stack(servers=1, config_text=flow_config("  maxRequests: 1")) as stack, \
            aiohttp.ClientSession() as s:
        await slow(stack, 50)
        t = Timed(s, stack.url)
        busy = asyncio.create_task(t.send("busy", max_tokens=30))
        await wait_until(lambda: _running(stack), 5, "the pod busy")
        # A client that gives up while queued: removed from the queue at once.
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(f"{stack.url}/v1/completions", data=completion_body("impatient"),
                              timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                await r.read()
        await wait_until(lambda: _queued_is(stack, 0), 5, "the abandoned request out of the queue")
        held = asyncio.create_task(t.send("held"))
        await until_queued(stack, 1)
        await t.send("over-cap")
        _, status, headers, _ = t.ends["over-cap"]
        assert status == 429 and headers["x-llm-d-request-dropped-reason"] == "rejected-saturated"
        await asyncio.gather(busy, held)
        assert t.ends["held"][1] == 200
        assert stack.picker is not None
        m = stack.picker.metrics
        assert m.sample_value("llm_d_epp_flow_control_requests_total",
                              {"outcome": "EvictedContextCancelled", "priority": "0", "inference_pool": "default"}) == 1
        assert m.sample_value("llm_d_epp_flow_control_requests_total",
                              {"outcome": "RejectedCapacity", "priority": "0", "inference_pool": "default"}) == 1
        served = [srv.engine.stats.finished for srv in stack.fleet.servers]
        assert sum(sum(f.values()) for f in served) == 2  # busy and held; never the impatient one


async def _queued_is(stack: Stack, n: int) -> bool:
    return queued(stack) == n


async def test_a_pool_without_endpoints_is_a_waiting_room_until_one_appears() -> None:
    cfg = flow_config("  noEndpointRequestTTL: 20s")
    async with in_process_stack(servers=1, config_text=cfg, endpoints_file=True) as stack, \
            aiohttp.ClientSession() as s:
        assert stack.picker is not None
        ep_file = stack.extras["endpoints_file"]
        ep_file.write_text("[]\n")
        await wait_until(lambda: _no_endpoints(stack), 5, "the pool empty")
        assert stack.picker.readiness.has_fresh_endpoint()  # still ready: the gateway keeps sending
        t = Timed(s, stack.url)
        waiting = asyncio.create_task(t.send("early"))
        await until_queued(stack, 1)
        await asyncio.sleep(1.0)
        assert not waiting.done()
        ep_file.write_text(f"- {stack.addresses[0]}\n")
        await asyncio.wait_for(waiting, 10)
        assert t.ends["early"][1] == 200


async def _no_endpoints(stack: Stack) -> bool:
    assert stack.picker is not None
    return not stack.picker.store.addresses()


async def test_a_held_pick_api_call_answers_when_it_dispatches_or_at_its_deadline() -> None:
    async with in_process_stack(servers=1, config_text=flow_config()) as stack:
        assert stack.picker is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.picker.bound_ports['grpc']}") as ch:
            stub = picker_pb2_grpc.EndpointPickerStub(ch)
            first = await stub.Pick(picker_pb2.PickRequest(model="sim-model", prompt="one"))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Pick(picker_pb2.PickRequest(model="sim-model", prompt="two"), timeout=0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: _queued_is(stack, 0), 5, "the expired Pick out of the queue")
            second = asyncio.ensure_future(stub.Pick(picker_pb2.PickRequest(model="sim-model", prompt="three")))
            await until_queued(stack, 1)
            await stub.Release(picker_pb2.ReleaseRequest(pick_id=first.pick_id))
            got = await asyncio.wait_for(second, 5)
            assert got.endpoint == first.endpoint


async def test_flow_control_metrics_and_a_bad_reload_keeps_the_queue_config() -> None:
    async with in_process_stack(servers=1, config_text=flow_config("  defaultRequestTTL: 30s")) as stack, \
            aiohttp.ClientSession() as s:
        assert stack.picker is not None and stack.config_path is not None
        await slow(stack, 50)
        t = Timed(s, stack.url)
        busy = asyncio.create_task(t.send("busy", max_tokens=60))
        await wait_until(lambda: _running(stack), 5, "the pod busy")
        held = asyncio.create_task(t.send("held", {"x-llm-d-inference-fairness-id": "tenant-a"}))
        await until_queued(stack, 1)
        async with s.get(f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}/metrics") as r:
            text = await r.text()
        assert 'llm_d_epp_flow_control_queue_size{fairness_id="tenant-a",inference_pool="default"' in text
        assert 'inference_extension_flow_control_queue_size{fairness_id="tenant-a"' in text
        assert 'llm_d_epp_flow_control_pool_saturation{inference_pool="default",stage="effective"} 1.0' in text
        before = stack.picker.built
        stack.config_path.write_text(flow_config("  defaultRequestTTL: 30s\n  bogusField: 1"))
        await asyncio.sleep(1.0)
        assert stack.picker.built is before and queued(stack) == 1  # logged, old config and queue kept
        await asyncio.gather(busy, held)
        assert t.ends["held"][1] == 200
        value = stack.picker.metrics.sample_value(
            "llm_d_epp_flow_control_request_queue_duration_seconds_count",
            {"fairness_id": "tenant-a", "priority": "0", "outcome": "Dispatched", "inference_pool": "default",
             "model_name": "sim-model", "target_model_name": "sim-model"})
        assert value == 1, [f.samples for f in stack.picker.metrics.prepare().collect()
                            if f.name == "llm_d_epp_flow_control_request_queue_duration_seconds"]


async def test_shutting_down_answers_what_still_waits_with_503() -> None:
    async with in_process_stack(servers=1, config_text=flow_config()) as stack, aiohttp.ClientSession() as s:
        await slow(stack, 50)
        t = Timed(s, stack.url)
        busy = asyncio.create_task(t.send("busy", max_tokens=20))
        await wait_until(lambda: _running(stack), 5, "the pod busy")
        held = asyncio.create_task(t.send("held"))
        await until_queued(stack, 1)
        assert stack.picker is not None and stack.picker.director.waiting is not None
        stack.picker.director.waiting.close()  # what PickerServer.stop does first
        await asyncio.wait_for(held, 5)
        _, status, headers, data = t.ends["held"]
        assert status == 503 and headers["x-llm-d-request-dropped-reason"] == "rejected-shutting-down"
        assert orjson.loads(data)["error"]["code"] == 503
        await busy


SHEDDABLE = CRITICAL + """\
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: default}}
"""


@pytest.mark.parametrize(("template", "stream", "workers"), [
    ("epp-full-duplex", False, 0), ("epp-full-duplex", True, 0), ("epp-buffered", False, 0),
    ("epp-buffered", True, 0), ("epp-full-duplex", True, 2)])
async def test_a_running_sheddable_request_is_evicted_for_queued_critical_work(template: str, stream: bool,
                                                                               workers: int) -> None:
    cfg = flow_config("  enableEviction: true")
    more: dict[str, Any] = {"serve": {"workers": workers}, "epp_cluster": ONE_STREAM_PER_CONNECTION} if workers else {}
    async with in_process_stack(servers=1, template=template, config_text=cfg, objectives_text=SHEDDABLE,
                                **more) as stack, aiohttp.ClientSession() as s:
        await slow(stack, 50)
        t = Timed(s, stack.url)
        cut: list[bytes] = []

        async def streamed_batch() -> None:  # the response had started: the client sees it cut short
            body = completion_body("batch " * 20, max_tokens=60, stream=True)
            async with s.post(f"{stack.url}/v1/completions", data=body, headers={
                    "content-type": "application/json", "x-llm-d-inference-objective": "batch"}) as r:
                assert r.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for chunk in r.content.iter_any():
                        cut.append(chunk)

        batch = asyncio.create_task(streamed_batch() if stream else t.send(
            "batch", {"x-llm-d-inference-objective": "batch"}, max_tokens=60))  # ~3 s
        await wait_until(lambda: _running(stack), 5, "the pod busy with the sheddable request")
        if stream:
            await asyncio.sleep(0.3)  # its first tokens are out: the eviction cuts a started stream
        await t.send("crit", {"x-llm-d-inference-objective": "critical"}, max_tokens=2)
        assert t.ends["crit"][1] == 200
        await asyncio.wait_for(batch, 5)
        if stream:
            assert cut and b"[DONE]" not in b"".join(cut)
        else:
            _, status, headers, data = t.ends["batch"]
            assert status == 429 and headers["x-llm-d-request-dropped-reason"] == "evicted"
            assert orjson.loads(data)["error"]["type"] == "RateLimitError"
        engine = stack.fleet.servers[0].engine
        await wait_until(lambda: _aborted(stack), 5, "the pod told to stop the evicted request")
        assert engine.stats.finished["stop"] + engine.stats.finished["length"] == 1  # the critical one
        assert stack.picker is not None
        m = stack.picker.metrics
        assert m.sample_value("llm_d_epp_flow_control_revocations_issued_total",
                              {"priority": "10", "inference_pool": "default"}) == 1
        assert m.sample_value("llm_d_epp_flow_control_revocations_total",
                              {"outcome": "confirmed", "inference_pool": "default"}) == 1


async def _aborted(stack: Stack) -> bool:
    return stack.fleet.servers[0].engine.stats.finished["abort"] == 1


@pytest.mark.parametrize("workers", [0, 2])
async def test_a_sheddable_stream_revoked_before_its_first_token_gets_a_clean_429(workers: int) -> None:
    progress = flow_config("  enableEviction: true").replace(
        "plugins:\n", "plugins:\n- type: priority-then-progress-eviction-order-policy\n", 1)
    more: dict[str, Any] = {"serve": {"workers": workers}, "epp_cluster": ONE_STREAM_PER_CONNECTION} if workers else {}
    async with in_process_stack(servers=1, config_text=progress, objectives_text=SHEDDABLE,
                                **more) as stack, aiohttp.ClientSession() as s:
        await slow(stack, 1500)  # the pod's first step (the prompt) takes 1.5 s
        t = Timed(s, stack.url)
        batch = asyncio.create_task(t.send("batch", {"x-llm-d-inference-objective": "batch"}, max_tokens=20,
                                           stream=True))
        await wait_until(lambda: _running(stack), 5, "the pod computing the sheddable prompt")
        crit = asyncio.create_task(t.send("crit", {"x-llm-d-inference-objective": "critical"}, max_tokens=2))
        await asyncio.wait_for(batch, 5)
        _, status, headers, data = t.ends["batch"]
        # epp held the response's headers until its first body bytes (gateway mode): the client
        # asked for a stream and gets a whole answer, a 429 it may retry, not a 200 that breaks off.
        assert status == 429 and headers["x-llm-d-request-dropped-reason"] == "evicted"
        assert orjson.loads(data)["error"]["type"] == "RateLimitError"
        await slow(stack, 0)
        await asyncio.wait_for(crit, 10)
        assert t.ends["crit"][1] == 200
        await wait_until(lambda: _aborted(stack), 5, "the pod told to stop the evicted request")
