"""The simulator's KV events, framed and hashed as vLLM 0.32 does (checked against the recording)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from epp.blockhash import block_digests, external, root_hash
from epp.sim.kvevents import KVEventsConfig, binds
from epp.sim.profiles import profile
from epp.sim.server import SimServer
from epp.stack.local import free_port


def test_config_shape_and_bind_rule() -> None:
    cfg = KVEventsConfig.parse('{"enable_kv_cache_events": true, "publisher": "zmq", '
                               '"endpoint": "tcp://127.0.0.1:{port+1000}", "replay_endpoint": "tcp://127.0.0.1:{port+2000}",'
                               ' "topic": "kv-events", "buffer_steps": 10, "hwm": 5, "max_queue_size": 9}')
    one = cfg.for_server(8001, 0)
    assert (one.endpoint, one.replay_endpoint) == ("tcp://127.0.0.1:9001", "tcp://127.0.0.1:10001")
    with pytest.raises(ValueError, match="unknown field"):
        KVEventsConfig.parse('{"enable_kv_cache_events": true, "bogus": 1}')
    assert binds("tcp://*:5557") and binds("ipc:///tmp/x") and binds("tcp://[::]:1")
    assert not binds("tcp://127.0.0.1:5557")


async def _collect(sub: zmq.asyncio.Socket, n_batches: int) -> list[list[bytes]]:
    frames = []
    while len(frames) < n_batches:
        frames.append(await asyncio.wait_for(sub.recv_multipart(), 5))
    return frames


async def test_events_match_vllm_framing_and_hashes(vllm_kv_frames: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        endpoint = f"ipc://{Path(d)}/kv-{{port}}.sock"
        cfg = KVEventsConfig(True, "zmq", endpoint, f"ipc://{Path(d)}/replay-{{port}}.sock", topic="kv-events")
        ctx = zmq.asyncio.Context()
        server = SimServer(free_port(), profile("fast").with_overrides(block_size=16), kv_events=cfg, zmq_ctx=ctx)
        await server.start()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(server.kv_events.endpoint)  # type: ignore[union-attr]
        await asyncio.sleep(0.2)
        try:
            prompt = list(range(1, 49))  # 3 full blocks of 16
            async with aiohttp.ClientSession() as s, s.post(
                f"http://{server.address}/v1/completions",
                json={"model": "sim-model", "prompt": prompt, "max_tokens": 2, "ignore_eos": True},
            ) as r:
                assert r.status == 200
            frames = await _collect(sub, 1)
            topic, seq, payload = frames[0]
            assert topic == b"kv-events" and len(seq) == 8 and int.from_bytes(seq, "big") == 0
            ts, events, dp_rank = msgpack.unpackb(payload, strict_map_key=False)
            assert isinstance(ts, float) and dp_rank == 0
            stored = events[0]
            real = next(e for f in vllm_kv_frames for e in f["batch"][1] if e["type"] == "BlockStored")
            assert list(stored) == list(real)  # same keys in the same order
            expected = [external(x) for x in block_digests(prompt, 16, root_hash())]
            assert stored["block_hashes"] == expected and stored["token_ids"] == prompt
            # Replay: everything from seq 0, then the end marker.
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(server.kv_events.replay_endpoint)  # type: ignore[union-attr, arg-type]
            await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            got = await asyncio.wait_for(dealer.recv_multipart(), 5)
            assert got == [b"", seq, payload]
            end = await asyncio.wait_for(dealer.recv_multipart(), 5)
            assert end == [b"", (-1).to_bytes(8, "big", signed=True), b""]
            dealer.close(0)
            # reset_prefix_cache publishes AllBlocksCleared with the next sequence number.
            async with aiohttp.ClientSession() as s, s.post(f"http://{server.address}/reset_prefix_cache") as r:
                assert r.status == 200
            topic, seq, payload = (await _collect(sub, 1))[0]
            assert int.from_bytes(seq, "big") == 1
            assert msgpack.unpackb(payload)[1] == [{"type": "AllBlocksCleared"}]
        finally:
            sub.close(0)
            await server.stop()
            ctx.term()
