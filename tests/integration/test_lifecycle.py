"""In-flight accounting survives clients and Envoy going away mid-request."""

from __future__ import annotations

import asyncio

import aiohttp

from epp.stack.local import Stack, in_process_stack, wait_until

from .conftest import completion_body


async def inflight(stack: Stack) -> int:
    assert stack.picker is not None
    return sum(stack.picker.store.inflight.values())


async def test_client_abort_mid_stream_releases_the_pick() -> None:
    async with in_process_stack(servers=2) as stack:
        for srv in stack.fleet.servers:
            srv.engine.extra_step_latency_s = 0.05
        async with aiohttp.ClientSession() as s:
            resp = await s.post(f"{stack.url}/v1/completions", data=completion_body("slow", max_tokens=200,
                                                                                    stream=True))
            await resp.content.readany()  # the stream has started
            assert await inflight(stack) == 1
            resp.close()  # the client goes away
        await wait_until(lambda: _zero(stack), 5, "in-flight back to 0 after the client left")


async def test_envoy_going_away_releases_every_pick() -> None:
    async with in_process_stack(servers=2) as stack:
        for srv in stack.fleet.servers:
            srv.engine.extra_step_latency_s = 0.05
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.ensure_future(s.post(f"{stack.url}/v1/completions",
                                                  data=completion_body(f"long {i}", max_tokens=200)))
                     for i in range(5)]
            await wait_until(lambda: _count(stack, 5), 5, "5 requests in flight")
            stack.envoy.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
        await wait_until(lambda: _zero(stack), 5, "in-flight back to 0 after Envoy went away")


async def _zero(stack: Stack) -> bool:
    return await inflight(stack) == 0


async def _count(stack: Stack, n: int) -> bool:
    return await inflight(stack) == n
