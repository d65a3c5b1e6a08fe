"""--allow-mode-override through a real Envoy: epp asks the gateway to skip response bodies it has
no use for, Envoy then sends none and ends the ext_proc stream with the response (which ends the
request's in-flight count then, not before), and a gateway that does not allow it is noticed."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from epp.sim.profiles import profile
from epp.stack.local import Stack, in_process_stack, wait_until

# A gateway that buffers the request and streams the response to its processor (the modes in
# which Envoy honours a mode_override), with and without allowing overrides.
STREAMED_RESPONSE: dict[str, Any] = {"processing_mode": {"request_body_mode": "BUFFERED",
                                                         "response_body_mode": "STREAMED"}}
ALLOWING = {**STREAMED_RESPONSE, "allow_mode_override": True}
TOKENS = 40


def skips(stack: Stack, outcome: str) -> float | None:
    return stack.picker.metrics.registry.get_sample_value("epp_response_body_skips_total", {"outcome": outcome})


async def stream_through(stack: Stack) -> tuple[int, list[bytes], int]:
    """One streamed chat request: its status, its SSE events, and the picker's in-flight count
    seen while the response was streaming."""
    mid = -1
    events: list[bytes] = []
    model = stack.fleet.servers[0].params.names()[0]
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "tell me a story"}],
                         "max_tokens": TOKENS, "ignore_eos": True, "stream": True})
    async with aiohttp.ClientSession() as s, s.post(f"{stack.url}/v1/chat/completions", data=body,
                                                    headers={"content-type": "application/json"}) as r:
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            if mid < 0 and buf.count(b"data: ") >= TOKENS // 2:
                mid = sum(stack.picker.store.inflight.values())
        events = [e for e in buf.split(b"\n\n") if e.startswith(b"data: ")]
        return r.status, events, mid


async def released(stack: Stack) -> None:
    async def zero() -> bool:
        return sum(stack.picker.store.inflight.values()) == 0
    await wait_until(zero, 5, "the request's in-flight count released")


def complete(events: list[bytes]) -> bool:
    content = [e for e in events if b'"content":"' in e.replace(b": ", b":") and b'"content":""' not in e]
    return events[-1] == b"data: [DONE]" and len(content) >= TOKENS - 1


@pytest.mark.timeout(120)
async def test_an_allowed_skip_sends_no_body_to_epp_and_ends_with_the_response() -> None:
    async with in_process_stack(servers=1, params=profile("h100-llama8b"), template="epp-buffered",
                                ext_proc=ALLOWING, serve={"allow_mode_override": True}) as stack:
        for _ in range(3):
            status, events, mid = await stream_through(stack)
            assert status == 200 and complete(events), events[-3:]
            assert mid == 1  # still counted while it streams: the stream's end, not its headers, finishes it
            await released(stack)
        assert skips(stack, "asked") == 3 and skips(stack, "ignored") == 0  # Envoy sent no body chunk


@pytest.mark.timeout(120)
async def test_a_gateway_that_does_not_allow_it_is_noticed_and_nothing_is_lost(caplog: pytest.LogCaptureFixture) \
        -> None:
    async with in_process_stack(servers=1, params=profile("h100-llama8b"), template="epp-buffered",
                                ext_proc=STREAMED_RESPONSE, serve={"allow_mode_override": True}) as stack:
        for _ in range(2):
            status, events, _mid = await stream_through(stack)
            assert status == 200 and complete(events)
            await released(stack)
        assert skips(stack, "asked") == 2 and skips(stack, "ignored") == 2
        warned = [r for r in caplog.records if "allow_mode_override" in r.getMessage()]
        assert len(warned) == 1  # once, not per request


@pytest.mark.timeout(120)
async def test_without_the_flag_epp_never_asks() -> None:
    async with in_process_stack(servers=1, params=profile("h100-llama8b"), template="epp-buffered",
                                ext_proc=ALLOWING) as stack:
        status, events, mid = await stream_through(stack)
        assert status == 200 and complete(events) and mid == 1
        await released(stack)
        assert skips(stack, "asked") is None  # not even registered
        await asyncio.sleep(0)
