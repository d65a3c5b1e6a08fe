"""`epp record` against a running stack: a trace of the live requests with block hashes and
token counts and, by default, no prompt text; prompts only where epp allows them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import pytest

from epp.requestcontrol.recorder import block_hashes, flow_label
from epp.stack.local import Stack, in_process_stack, wait_until
from epp.tuning.record import RecordError, RecordSummary, record_trace

from .conftest import chat_body, post

SECRET = "the launch code is 0000-swordfish "
SHARED = "You are the travel desk's assistant. Answer with fares only. " * 12


async def _send(stack_url: str, n: int) -> None:
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            status, _, _ = await post(s, f"{stack_url}/v1/chat/completions",
                                      chat_body(f"{SHARED}{SECRET}{i}", max_tokens=3))
            assert status == 200


async def start_recording(stack: Stack, out: Path, requests: int) -> asyncio.Task[RecordSummary]:
    """``epp record`` of ``requests`` requests from the stack's epp into ``out``, once it is on."""
    assert stack.picker is not None
    url = f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}"
    ready = asyncio.Event()
    recording = asyncio.create_task(record_trace(url, out, seconds=20, requests=requests, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    return recording


async def test_the_trace_holds_hashes_and_counts_not_prompts(tmp_path: Path) -> None:
    async with in_process_stack(servers=2) as stack:
        out = tmp_path / "trace.jsonl"
        recording = await start_recording(stack, out, requests=5)
        await _send(stack.url, 5)
        summary = await recording
        assert summary.records == 5
        raw = out.read_bytes()
        assert b"swordfish" not in raw and b"travel desk" not in raw  # the privacy default
        head, *records = [orjson.loads(line) for line in raw.splitlines()]
        # The header: the pool as its metrics describe it (what a replay configures engines from).
        assert sorted(p["address"] for p in head["pool"]) == sorted(stack.addresses)
        assert {(p["block_size"], p["num_gpu_blocks"]) for p in head["pool"]} == {(16, 4096)}
        assert records[0]["t"] == 0 and all(r["t"] >= 0 for r in records)
        r = records[0]
        assert r["model"] == "sim-model" and r["status"] == 200 and r["completion_tokens"] == 3
        assert r["prompt_tokens"] > 0 and r["max_tokens"] == 3 and r["endpoint"] in stack.addresses
        assert "prompt" not in r
        assert r["priority"] == 0 and r["flow"] is None  # no objective, no fairness id: the default flow
        # The shared system prompt shows as a shared leading run of block hashes.
        a, b = records[0]["blocks"], records[1]["blocks"]
        shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y) if a != b else len(a)
        assert shared >= 10  # (the prompts differ only in their last, partial block)


def test_flows_are_recorded_as_hashes_not_tenant_names() -> None:
    one, again, other = flow_label("acme-corp"), flow_label("acme-corp"), flow_label("globex")
    assert one == again != other and len(one or "") == 12 and "acme" not in (one or "")
    assert flow_label("") is None


def test_block_hashes_follow_the_prefix() -> None:
    one, two = block_hashes("m", SHARED + "first"), block_hashes("m", SHARED + "second, longer" * 10)
    assert one == two[:len(one)] and len(one) == len(SHARED + "first") // 64
    assert block_hashes("other-model", SHARED) != block_hashes("m", SHARED)  # per model, as the index keys


async def test_prompts_only_where_epp_allows_them(tmp_path: Path) -> None:
    async with in_process_stack(servers=1) as stack:
        assert stack.picker is not None
        url = f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}"
        with pytest.raises(RecordError, match="403 this epp does not record prompt text"):
            await record_trace(url, tmp_path / "t.jsonl", seconds=5, prompts=True)
    async with in_process_stack(servers=1, serve={"record_prompts": True}) as stack:
        assert stack.picker is not None
        url = f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}"
        ready = asyncio.Event()
        recording = asyncio.create_task(record_trace(url, tmp_path / "p.jsonl", seconds=20, requests=1, prompts=True,
                                                     ready=ready))
        await asyncio.wait_for(ready.wait(), 10)
        await _send(stack.url, 1)
        await recording
        record = orjson.loads((tmp_path / "p.jsonl").read_bytes().splitlines()[1])
        assert "swordfish" in record["prompt"]


async def test_a_request_flow_control_refused_is_recorded_as_offered_load(tmp_path: Path) -> None:
    from .test_flow_control import Timed, _running, flow_config, slow

    async with in_process_stack(servers=1, config_text=flow_config("  defaultRequestTTL: 200ms")) as stack, \
            aiohttp.ClientSession() as s:
        out = tmp_path / "trace.jsonl"
        recording = await start_recording(stack, out, requests=2)
        await slow(stack, 50)
        t = Timed(s, stack.url)
        busy = asyncio.create_task(t.send("busy", max_tokens=20))  # holds the only slot ~1 s
        await wait_until(lambda: _running(stack), 5, "the pod busy")
        await t.send("late")  # waits its 200 ms budget, then 429
        await busy
        await recording
        records = [orjson.loads(line) for line in out.read_bytes().splitlines()[1:]]
        assert sorted(r["status"] for r in records) == [200, 429]
        refused = next(r for r in records if r["status"] == 429)
        assert refused["endpoint"] == "" and refused["completion_tokens"] == 0 and refused["blocks"] is not None
