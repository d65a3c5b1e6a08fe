"""The body at the pod is byte-identical to the client's, in every body mode, through real Envoy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from epp.stack.local import Stack, in_process_stack

from .conftest import completion_body, post, sha

SIZES = [2_000, 65_537, 1_048_576, 4 * 1_048_576 + 3]


def body_of(size: int) -> bytes:
    base = len(completion_body("", max_tokens=1))
    return completion_body("x" * (size - base), max_tokens=1)


async def logged(stack: Stack, test_id: str) -> dict[str, object]:
    for s in stack.fleet.servers:
        for entry in s.request_log:
            if entry["headers"].get("x-test-id") == test_id:  # type: ignore[attr-defined]
                return entry
    raise AssertionError(f"request {test_id} reached no pod")


async def trickle(data: bytes, pieces: int = 8, delay: float = 0.02) -> AsyncIterator[bytes]:
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        yield data[i : i + step]
        await asyncio.sleep(delay)


@pytest.mark.parametrize("template", ["epp-full-duplex", "epp-buffered"])
async def test_bodies_arrive_intact(template: str) -> None:
    async with in_process_stack(servers=2, template=template) as stack, aiohttp.ClientSession() as s:
        for size in SIZES:
            body = body_of(size)
            assert len(body) == size
            tid = f"{template}-{size}"
            status, _, _ = await post(s, f"{stack.url}/v1/completions", body,
                                            headers={"x-test-id": tid, "content-type": "application/json"})
            entry = await logged(stack, tid)
            assert entry["body_len"] == size and entry["sha256"] == sha(body), tid
            assert status in (200, 400), tid  # 4 MiB exceeds the model's context: the pod says 400
        # Trickled (chunked transfer encoding, pieces with pauses).
        body = body_of(100_000)
        tid = f"{template}-trickle"
        status, _, _ = await post(s, f"{stack.url}/v1/completions", trickle(body),
                                  headers={"x-test-id": tid, "content-type": "application/json"})
        assert status == 200
        entry = await logged(stack, tid)
        assert entry["sha256"] == sha(body)
        # Empty body on a header-only path still routes and arrives empty.
        tid = f"{template}-empty"
        status, _, _ = await post(s, f"{stack.url}/tokenize", b"", headers={"x-test-id": tid})
        entry = await logged(stack, tid)
        assert entry["body_len"] == 0


async def test_sse_streams_incrementally_and_unchanged() -> None:
    async with in_process_stack(servers=1) as stack, aiohttp.ClientSession() as s:
        server = stack.fleet.servers[0]
        server.engine.extra_step_latency_s = 0.05
        body = completion_body("stream me", max_tokens=8, stream=True)
        arrivals: list[float] = []
        raw = b""
        loop = asyncio.get_running_loop()
        async with s.post(f"{stack.url}/v1/completions", data=body) as r:
            assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
            async for chunk in r.content.iter_any():
                arrivals.append(loop.time())
                raw += chunk
        events = [e for e in raw.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]" and len(events) == 9
        assert all(e.startswith(b"data: {") for e in events[:-1])
        # Tokens come ~50 ms apart: the client must see them spread out, not in one burst at the end.
        assert len(arrivals) >= 4 and arrivals[-1] - arrivals[0] > 0.2
