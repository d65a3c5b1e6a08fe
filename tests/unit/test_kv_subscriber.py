"""KV-event subscriber + precise index against the simulator's vLLM-framed publisher."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import zmq.asyncio

from epp.blockhash import block_digests, external, root_hash
from epp.scheduling.precise_index import PreciseIndex
from epp.signals.kvevents import KVEventSource, KVEventSubscriber, connect_address, publisher_binds
from epp.sim.kvevents import KVEventsConfig
from epp.sim.profiles import profile
from epp.sim.server import SimServer
from epp.stack.local import free_port, free_ports, wait_until

PROMPT = "the shared system prompt of a support bot, long enough for several blocks " * 4


def expected_hashes(server: SimServer, prompt: str) -> list[int]:
    ids = server.engine.tokenizer.encode(prompt)
    return [external(d) for d in block_digests(ids, server.params.block_size, root_hash())]


async def complete(server: SimServer, prompt: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(
        f"http://{server.address}/v1/completions",
        json={"model": "sim-model", "prompt": prompt, "max_tokens": 2, "ignore_eos": True},
    ) as r:
        assert r.status == 200


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    c = zmq.asyncio.Context()
    yield c
    c.term()


def test_bind_or_connect_follows_vllm() -> None:
    assert publisher_binds("tcp://*:5557") and publisher_binds("ipc:///x") and not publisher_binds("tcp://1.2.3.4:5")
    assert connect_address("tcp://*:5557", "10.0.0.7") == "tcp://10.0.0.7:5557"
    assert connect_address("tcp://[::]:5557", "10.0.0.7") == "tcp://10.0.0.7:5557"
    src = KVEventSource("10.0.0.7:8000", "tcp://10.0.0.9:6000")
    assert src.pod_host == "10.0.0.7"


async def test_connect_mode_late_join_replay_clear_and_restart(ctx: zmq.asyncio.Context) -> None:
    with tempfile.TemporaryDirectory() as d:
        cfg = KVEventsConfig(True, "zmq", f"ipc://{Path(d)}/kv.sock", f"ipc://{Path(d)}/replay.sock",
                             topic="kv-events")
        server = SimServer(free_port(), profile("fast"), kv_events=cfg, zmq_ctx=ctx)
        await server.start()
        index = PreciseIndex()
        assert server.kv_events is not None
        src = KVEventSource(server.address, server.kv_events.endpoint, server.kv_events.replay_endpoint,
                            "kv-events")
        sub = KVEventSubscriber(src, index, ctx)
        try:
            # Two batches happen before the subscriber exists: it must fetch them from the replay.
            await complete(server, PROMPT + " first")
            await complete(server, "another unrelated prompt that is long enough to fill blocks " * 3)
            await sub.start()
            await asyncio.sleep(0.2)
            # New full blocks (a cached prefix plus a short suffix would publish nothing, as in vLLM).
            second = PROMPT + " second: " + "a new tail that fills more blocks " * 4
            await complete(server, second)
            await wait_until(lambda: _applied(sub, 3), 5, "three batches")
            assert sub.stats.replayed >= 2 and sub.stats.lost == 0
            for h in expected_hashes(server, second):
                assert index.holds(server.address, h)
            lengths = index.match_lengths(expected_hashes(server, PROMPT + " third"))
            assert lengths[server.address] >= 4
            # reset_prefix_cache -> AllBlocksCleared -> the pod's blocks are gone.
            assert server.engine.reset_prefix_cache()
            await wait_until(lambda: _empty(index, server.address), 5, "AllBlocksCleared applied")
            # A restart (sequence back to 0) clears the pod before applying the new history.
            await complete(server, PROMPT + " before crash " + "padding words to fill blocks " * 3)
            await wait_until(lambda: _nonempty(index, server.address), 5, "blocks after reset")
            await server.apply_admin({"crash_for_s": 0.2})
            await asyncio.sleep(0.6)
            await complete(server, "after the restart the cache is cold and this prompt is new " * 3)
            await wait_until(lambda: _restarted(sub), 5, "restart detected")
            assert not index.holds(server.address, expected_hashes(server, PROMPT)[0])
        finally:
            await sub.stop()
            await server.stop()


async def test_bind_mode_when_the_engine_connects_like_vllm_does(ctx: zmq.asyncio.Context) -> None:
    kv_port, replay_port = free_ports(2)
    cfg = KVEventsConfig(True, "zmq", f"tcp://127.0.0.1:{kv_port}", f"tcp://127.0.0.1:{replay_port}",
                         topic="kv-events")
    index = PreciseIndex()
    server = SimServer(free_port(), profile("fast"), kv_events=cfg, zmq_ctx=ctx)
    src = KVEventSource(server.address, cfg.endpoint, cfg.replay_endpoint, "kv-events")
    sub = KVEventSubscriber(src, index, ctx)
    assert sub.binds and sub.address == f"tcp://127.0.0.1:{kv_port}"
    await sub.start()
    await server.start()  # the simulator connects, as vLLM does for tcp://host:port
    try:
        await asyncio.sleep(0.3)
        await complete(server, PROMPT)
        await wait_until(lambda: _applied(sub, 1), 5, "a batch over the bound XSUB")
        assert all(index.holds(server.address, h) for h in expected_hashes(server, PROMPT))
    finally:
        await sub.stop()
        await server.stop()


def test_index_is_bounded_per_pod() -> None:
    index = PreciseIndex(max_blocks_per_pod=1000)
    index.stored("a", range(5000))
    assert index.blocks_of("a") == 1000 and not index.holds("a", 0) and index.holds("a", 4999)
    index.removed("a", [4999])
    assert not index.holds("a", 4999) and index.size() == 999


async def _applied(sub: KVEventSubscriber, n: int) -> bool:
    return sub.stats.batches >= n


async def _empty(index: PreciseIndex, pod: str) -> bool:
    return index.blocks_of(pod) == 0


async def _nonempty(index: PreciseIndex, pod: str) -> bool:
    return index.blocks_of(pod) > 0


async def _restarted(sub: KVEventSubscriber) -> bool:
    return sub.stats.restarts >= 1


def test_index_shared_blocks_and_match_lengths() -> None:
    index = PreciseIndex()
    index.stored("a", [1, 2, 3, 4])
    index.stored("b", [1, 2])
    index.stored("c", [9])
    assert index.match_lengths([1, 2, 3, 4, 5]) == {"a": 4, "b": 2}
    index.removed("a", [2])
    assert index.match_lengths([1, 2, 3]) == {"a": 1, "b": 2}
    index.clear("b")
    assert index.match_lengths([1, 2, 3]) == {"a": 1} and index.holds("c", 9) and not index.holds("b", 1)
    index.apply("c", [{"type": "BlockStored", "block_hashes": [1]}, {"type": "AllBlocksCleared"}])
    assert index.blocks_of("c") == 0
