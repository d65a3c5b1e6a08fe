"""Routing decisions through a real Envoy in front of the simulated fleet."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp
import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.config import DEFAULT_CONFIG
from epp.stack.local import Stack, in_process_stack, wait_until
from epp.v1 import picker_pb2, picker_pb2_grpc

from .conftest import chat_body, completion_body, post


async def pin(stack: Stack, address: str, **values: float) -> None:
    await stack.server(address).apply_admin({"pin": values})


async def scraped(stack: Stack) -> None:
    """Wait until every endpoint has been scraped by a scrape that *started* after this point.

    A scrape in flight when a pin is set completes later with the old values, so wait for two
    completions: an endpoint's next scrape starts only after its previous one completed.
    """
    assert stack.picker is not None
    store = stack.picker.store
    for _ in range(2):
        since = time.monotonic()

        async def all_newer(since: float = since) -> bool:
            return all((s := store.get(a)) is not None and s.scraped_at > since for a in store.addresses())

        await wait_until(all_newer, 5, "a fresh scrape of every endpoint")


async def served_by(s: aiohttp.ClientSession, stack: Stack, body: bytes, path: str = "/v1/completions") -> str:
    status, headers, data = await post(s, f"{stack.url}{path}", body)
    assert status == 200, data
    return headers["x-sim-server"]


async def test_avoids_long_queue_and_prefers_low_kv() -> None:
    async with in_process_stack(servers=4) as stack, aiohttp.ClientSession() as s:
        a, b, c, d = stack.addresses
        await pin(stack, a, num_requests_waiting=30)
        await scraped(stack)
        seen = Counter([await served_by(s, stack, completion_body(f"q {i}")) for i in range(20)])
        assert a not in seen and len(seen) >= 2
        for x in (a, b, c):
            await pin(stack, x, num_requests_waiting=0, kv_cache_usage_perc=0.9)
        # Pin d's queue too: a live 0-vs-1 waiting difference swings the min-max queue score fully.
        await pin(stack, d, num_requests_waiting=0, kv_cache_usage_perc=0.05)
        await scraped(stack)
        seen = Counter([await served_by(s, stack, completion_body(f"kv {i}")) for i in range(10)])
        assert seen == Counter({d: 10})


async def test_shared_prefix_group_stays_on_one_pod_and_hits_its_cache() -> None:
    async with in_process_stack(servers=4) as stack, aiohttp.ClientSession() as s:
        system = "You are the support bot of ACME. Policies: " + "be kind and precise. " * 40
        pods = set()
        cached = []
        for i in range(8):
            status, headers, data = await post(s, f"{stack.url}/v1/chat/completions",
                                               chat_body(system + f" Question number {i}?"))
            assert status == 200
            pods.add(headers["x-sim-server"])
            cached.append(orjson.loads(data)["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert len(pods) == 1
        assert cached[0] == 0 and min(cached[1:]) > 100


SHEDDABLE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: default}}
"""


async def test_error_responses_are_openai_json() -> None:
    async with in_process_stack(servers=2, objectives_text=SHEDDABLE) as stack, aiohttp.ClientSession() as s:
        status, headers, data = await post(s, f"{stack.url}/v1/completions", b"{not json")
        assert status == 400 and headers["content-type"] == "application/json"
        assert orjson.loads(data)["error"]["code"] == 400
        status, _, data = await post(s, f"{stack.url}/v1/completions", b'{"prompt": "no model"}')
        assert status == 400 and "model" in orjson.loads(data)["error"]["message"]
        for addr in stack.addresses:
            await pin(stack, addr, num_requests_waiting=500)
        await scraped(stack)
        batch = {"x-gateway-inference-objective": "batch"}
        status, _, data = await post(s, f"{stack.url}/v1/completions", completion_body("x"), headers=batch)
        err = orjson.loads(data)["error"]
        assert status == 429 and err["code"] == 429 and err["type"] == "RateLimitError"
        # Not sheddable (no objective: priority 0): routed even though the pool is saturated.
        status, _, _ = await post(s, f"{stack.url}/v1/completions", completion_body("x"))
        assert status == 200


async def test_503_when_the_pool_is_empty() -> None:
    async with in_process_stack(servers=2, endpoints_file=True) as stack, aiohttp.ClientSession() as s:
        stack.extras["endpoints_file"].write_text("[]\n")
        assert stack.picker is not None
        await wait_until(lambda: _empty(stack), 5, "endpoints file reload")
        status, _, data = await post(s, f"{stack.url}/v1/completions", completion_body("x"))
        assert status == 503 and orjson.loads(data)["error"]["code"] == 503
        # A bad edit keeps the old set (still empty here) and logs; a good one restores routing.
        stack.extras["endpoints_file"].write_text("- not an address\n")
        await asyncio.sleep(0.5)
        stack.extras["endpoints_file"].write_text(f"- {stack.addresses[0]}\n")
        await wait_until(lambda: _fresh(stack), 5, "endpoint back")
        assert await served_by(s, stack, completion_body("x")) == stack.addresses[0]


async def _empty(stack: Stack) -> bool:
    return stack.picker is not None and not stack.picker.store.addresses()


async def _fresh(stack: Stack) -> bool:
    return stack.picker is not None and stack.picker.store.fresh_count() > 0


async def test_stale_or_failing_pods_are_avoided() -> None:
    async with in_process_stack(servers=3, staleness=0.5) as stack, aiohttp.ClientSession() as s:
        failing, hanging, good = stack.addresses
        await stack.server(failing).apply_admin({"metrics": "fail"})
        await stack.server(hanging).apply_admin({"metrics": "hang"})
        # The hanging one goes stale after the threshold; make the good one look worst on signals.
        await pin(stack, good, num_requests_waiting=20, kv_cache_usage_perc=0.9)
        assert stack.picker is not None
        store = stack.picker.store

        async def only_good_fresh() -> bool:
            snap = store.snapshot()
            fresh = {e.address for e in snap.endpoints if e.fresh(snap.now, snap.staleness)}
            g = store.get(good)
            return fresh == {good} and g is not None and g.signals is not None and g.signals.waiting == 20

        await wait_until(only_good_fresh, 10, "failing and hanging endpoints to drop out")
        seen = Counter([await served_by(s, stack, completion_body(f"s {i}")) for i in range(10)])
        assert seen == Counter({good: 10})
        await stack.server(hanging).apply_admin({"metrics": "ok"})


async def test_config_edit_changes_picks_without_restart() -> None:
    kv_only = DEFAULT_CONFIG.replace("    weight: 2\n  - pluginRef: kv-cache", "    weight: 0\n  - pluginRef: kv-cache")
    kv_only = kv_only.replace("weight: 3", "weight: 0")
    async with in_process_stack(servers=3, config_text=kv_only) as stack, aiohttp.ClientSession() as s:
        assert stack.config_path is not None
        a, b, c = stack.addresses
        await pin(stack, a, kv_cache_usage_perc=0.05, num_requests_waiting=10)
        for x in (b, c):
            await pin(stack, x, kv_cache_usage_perc=0.9)
        await scraped(stack)
        assert {await served_by(s, stack, completion_body(f"a {i}")) for i in range(5)} == {a}
        queue_only = DEFAULT_CONFIG.replace("weight: 3", "weight: 0").replace(
            "kv-cache-utilization-scorer\n    weight: 2", "kv-cache-utilization-scorer\n    weight: 0")
        stack.config_path.write_text(queue_only)
        loop = asyncio.get_running_loop()
        start = loop.time()
        while a == await served_by(s, stack, completion_body("probe")):
            assert loop.time() - start < 2.0, "config change not applied within 2 s"
            await asyncio.sleep(0.05)
        assert a not in {await served_by(s, stack, completion_body(f"b {i}")) for i in range(5)}
        # An invalid edit is ignored: routing keeps following the last good config.
        stack.config_path.write_text("schedulingProfiles: [oops")
        assert stack.picker is not None and stack.picker.config_watcher is not None
        watcher = stack.picker.config_watcher

        async def rejected() -> bool:
            return "invalid YAML" in (watcher.last_error or "")

        await wait_until(rejected, 5, "the invalid config to be seen and rejected")
        assert a not in {await served_by(s, stack, completion_body(f"c {i}")) for i in range(5)}


async def test_50_concurrent_requests_on_idle_fleet_use_every_pod() -> None:
    async with in_process_stack(servers=4) as stack, aiohttp.ClientSession() as s:
        for srv in stack.fleet.servers:
            srv.engine.extra_step_latency_s = 0.01  # requests overlap for ~100 ms
        results = await asyncio.gather(*(served_by(s, stack, completion_body(f"burst {i} " * 8, max_tokens=8))
                                         for i in range(50)))
        counts = Counter(results)
        assert set(counts) == set(stack.addresses)
        assert min(counts.values()) >= 8, counts


async def test_health_turns_ready_once_metrics_are_fresh() -> None:
    async with in_process_stack(servers=2, wait_ready=False) as stack:
        assert stack.picker is not None
        port = stack.picker.bound_ports["health"]
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = health_pb2_grpc.HealthStub(ch)

        async def ready() -> bool:
            r = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"))
            return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

        await wait_until(ready, 5, "readiness SERVING")
        for svc in ("", "liveness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            r = await stub.Check(health_pb2.HealthCheckRequest(service=svc))
            assert r.status == health_pb2.HealthCheckResponse.SERVING, svc
        for srv in stack.fleet.servers:
            await srv.apply_admin({"metrics": "fail"})
        await wait_until(lambda: _not(ready), 5, "readiness NOT_SERVING when no endpoint is fresh")
        await ch.close()


async def _not(check: object) -> bool:
    return not await check()  # type: ignore[operator]


async def test_pick_api_agrees_with_ext_proc() -> None:
    async with in_process_stack(servers=4) as stack, aiohttp.ClientSession() as s:
        assert stack.picker is not None
        best = stack.addresses[2]
        for addr in stack.addresses:
            await pin(stack, addr, num_requests_waiting=0, kv_cache_usage_perc=0.1 if addr == best else 0.8)
        await scraped(stack)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.picker.bound_ports['grpc']}") as ch:
            stub = picker_pb2_grpc.EndpointPickerStub(ch)
            resp = await stub.Pick(picker_pb2.PickRequest(
                model="sim-model", messages=picker_pb2.Messages(
                    messages=[picker_pb2.ChatMessage(role="user", content="same request")])))
            assert resp.endpoint == best and "kv-cache-utilization-scorer=0.90" in resp.reason
            assert {sc.endpoint for sc in resp.scores} == set(stack.addresses)
            assert (await stub.Release(picker_pb2.ReleaseRequest(pick_id=resp.pick_id))).released
            assert not (await stub.Release(picker_pb2.ReleaseRequest(pick_id=resp.pick_id))).released
            via_envoy = await served_by(s, stack, chat_body("same request"), "/v1/chat/completions")
            assert via_envoy == resp.endpoint
            # The raw-body form parses exactly like ext_proc does.
            raw = await stub.Pick(picker_pb2.PickRequest(body=chat_body("same request")))
            assert raw.endpoint == best
            try:
                await stub.Pick(picker_pb2.PickRequest(prompt="no model"))
                raise AssertionError("expected INVALID_ARGUMENT")
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_tls_between_envoy_and_epp_with_self_signed_cert(tmp_path: Path) -> None:
    async with in_process_stack(servers=2, secure=True) as stack, aiohttp.ClientSession() as s:
        assert await served_by(s, stack, completion_body("over tls")) in stack.addresses


async def test_get_models_routes_without_a_body() -> None:
    async with in_process_stack(servers=2) as stack, aiohttp.ClientSession() as s, s.get(f"{stack.url}/v1/models") as r:
        assert r.status == 200 and (await r.json())["data"][0]["id"] == "sim-model"
