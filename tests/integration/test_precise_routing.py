"""Precise prefix routing through a real Envoy: KV events from the simulated fleet, the closed loop
on cached_tokens, the injected usage event stripped from client streams, and the fallback."""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson

from epp.config import precise_config
from epp.scheduling.precise_scorer import PrecisePrefixCacheScorer
from epp.sim.kvevents import KVEventsConfig
from epp.stack.local import Stack, in_process_stack, wait_until

from .conftest import post

SYSTEM = "You are the helpful assistant of a bookshop; answer in one sentence and cite the shelf. " * 8


def config(kv_dir: str, **parameters: object) -> str:
    return precise_config("sim", f"ipc://{kv_dir}/kv-{{port}}.sock", f"ipc://{kv_dir}/replay-{{port}}.sock",
                          **parameters)


def kv_config(kv_dir: str) -> KVEventsConfig:
    return KVEventsConfig(True, "zmq", f"ipc://{kv_dir}/kv-{{port}}.sock", f"ipc://{kv_dir}/replay-{{port}}.sock")


def chat(question: str, **extra: object) -> bytes:
    return orjson.dumps({"model": "sim-model", "max_tokens": 3, "ignore_eos": True,
                         "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                         **extra})


def precise(stack: Stack) -> PrecisePrefixCacheScorer:
    assert stack.picker is not None
    scorers = stack.picker.director.scheduler.profile.scorers
    return next(s for s, _ in scorers if isinstance(s, PrecisePrefixCacheScorer))


@contextlib.asynccontextmanager
async def precise_stack(servers: int, **parameters: object) -> AsyncIterator[
        tuple[Stack, aiohttp.ClientSession, PrecisePrefixCacheScorer]]:
    """Fleet with KV events + epp with the precise scorer + Envoy, subscribed to every pod."""
    with tempfile.TemporaryDirectory() as d:
        async with in_process_stack(servers=servers, kv_events=kv_config(d),
                                    config_text=config(d, **parameters)) as stack, aiohttp.ClientSession() as s:
            await subscribed(stack)
            yield stack, s, precise(stack)


async def subscribed(stack: Stack) -> None:
    assert stack.picker is not None
    picker = stack.picker

    async def ready() -> bool:
        return len(picker.kv_events.subscribers) == len(stack.addresses)

    await wait_until(ready, 5, "a KV-event subscriber per pod")


async def test_routes_to_the_blocks_a_pod_reports_even_for_traffic_epp_did_not_route() -> None:
    async with precise_stack(3) as (stack, s, sc):
        warm = stack.addresses[1]
        # Another client talks to the pod directly: epp never saw this prompt.
        status, _, _ = await post(s, f"http://{warm}/v1/chat/completions", chat("first question"),
                                  headers={"content-type": "application/json"})
        assert status == 200

        async def reported() -> bool:
            return sc.index.blocks_of(warm) > 0

        await wait_until(reported, 5, "the pod's KV events")
        seen = Counter()
        for i in range(6):
            status, headers, _ = await post(s, f"{stack.url}/v1/chat/completions", chat(f"question {i}"))
            assert status == 200
            seen[headers["x-sim-server"]] += 1
        assert seen == {warm: 6}
        # The pod drops its cache: the index follows (AllBlocksCleared).
        async with s.post(f"http://{warm}/reset_prefix_cache") as r:
            assert r.status == 200

        async def cleared() -> bool:
            return sc.index.blocks_of(warm) == 0

        await wait_until(cleared, 5, "the index to drop the reset pod's blocks")


async def test_closed_loop_measures_precision_and_clients_get_the_stream_they_asked_for() -> None:
    async with precise_stack(2) as (stack, s, sc):
        for i in range(8):
            body = chat(f"streamed {i}", stream=True)
            status, _, data = await post(s, f"{stack.url}/v1/chat/completions", body)
            assert status == 200
            assert b'"usage"' not in data and data.endswith(b"data: [DONE]\n\n")  # what the client asked for
            asked = chat(f"with usage {i}", stream=True, stream_options={"include_usage": True})
            status, _, data = await post(s, f"{stack.url}/v1/chat/completions", asked)
            assert status == 200 and b'"cached_tokens"' in data  # usage the client asked for stays
            status, _, data = await post(s, f"{stack.url}/v1/chat/completions", chat(f"plain {i}"))
            assert status == 200 and orjson.loads(data)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        totals = sc.tracker.totals
        assert totals.samples >= 20 and totals.actual_tokens > 0
        assert sc.tracker.precision is not None and sc.tracker.precision > 0.9 and sc.tracker.trusted
        assert stack.picker is not None
        async with s.get(f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}/metrics") as r:
            text = await r.text()
        assert 'epp_prefix_routing_precise_active{name="default",plugin="precise-prefix-cache-scorer"} 1.0' in text
        assert "epp_prefix_routing_precision{" in text and "epp_kv_events_batches_total" in text


async def test_a_hash_mismatch_is_detected_and_routing_falls_back() -> None:
    async with precise_stack(2, hashSeed="12345", fallback={"minSamples": 4, "window": 8}) as (stack, s, sc):
        for i in range(8):
            status, _, _ = await post(s, f"{stack.url}/v1/chat/completions", chat(f"q {i}"))
            assert status == 200
        assert not sc.tracker.trusted and sc.tracker.totals.fallbacks == 1
        assert sc.tracker.precision is not None and sc.tracker.precision < 0.5
        # Routing continues on the approximate index: same prefix, same pod.
        seen = Counter()
        for i in range(4):
            _, headers, _ = await post(s, f"{stack.url}/v1/chat/completions", chat(f"again {i}"))
            seen[headers["x-sim-server"]] += 1
        assert len(seen) == 1


def test_config_template_renders() -> None:
    from epp.config import parse_config

    parse_config(config(str(Path("/tmp/x"))), "test")


async def test_release_with_cached_tokens_feeds_the_closed_loop() -> None:
    import grpc

    from epp.v1 import picker_pb2, picker_pb2_grpc

    async with precise_stack(2) as (stack, s, sc):
        assert stack.picker is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.picker.bound_ports['grpc']}") as ch:
            stub = picker_pb2_grpc.EndpointPickerStub(ch)
            for i in range(3):  # a non-Envoy gateway: pick, send it itself, release with usage
                body = chat(f"via the pick api {i}")
                resp = await stub.Pick(picker_pb2.PickRequest(body=body, path="/v1/chat/completions"))
                status, _, data = await post(s, f"http://{resp.endpoint}/v1/chat/completions", body,
                                             headers={"content-type": "application/json"})
                assert status == 200
                cached = orjson.loads(data)["usage"]["prompt_tokens_details"]["cached_tokens"]
                await stub.Release(picker_pb2.ReleaseRequest(pick_id=resp.pick_id, cached_tokens=cached))
        assert sc.tracker.totals.samples == 3 and sc.tracker.totals.actual_tokens > 0
