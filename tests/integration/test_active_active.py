"""Active-active replicas: two pickers behind one real Envoy, sharing state through a real Redis."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from epp.server.app import PickerServer
from epp.sim.profiles import profile
from epp.stack.local import wait_until
from epp.stack.replicas import ReplicaStack, redis_binary, replica_stack

from .conftest import completion_body, post

pytestmark = pytest.mark.skipif(redis_binary() is None, reason="no redis-server (make redis installs it)")


def picks(stack: ReplicaStack) -> list[int]:
    return [sum(p.store.total_picks.values()) for p in stack.pickers]


async def routed(s: aiohttp.ClientSession, stack: ReplicaStack, body: bytes) -> tuple[str, int]:
    """The pod that served ``body`` and the replica that picked it."""
    before = picks(stack)
    status, headers, data = await post(s, f"{stack.url}/v1/completions", body)
    assert status == 200, data
    after = picks(stack)
    (replica,) = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b > a]
    return headers["x-sim-server"], replica


def prompt(i: int) -> str:
    return f"conversation {i:03d} " + f"a shared system prompt of conversation {i} " * 60


async def pairs_on_one_pod(stack: ReplicaStack, n: int) -> tuple[int, set[tuple[int, int]]]:
    """Each of ``n`` prompts twice, one after the other: how many pairs one pod served, and which
    replicas picked the pairs."""
    same, replicas = 0, set()
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            first, r1 = await routed(s, stack, completion_body(prompt(i)))
            await asyncio.sleep(0.2)  # a few sharing rounds
            second, r2 = await routed(s, stack, completion_body(prompt(i)))
            same += first == second
            replicas.add((r1, r2))
    return same, replicas


async def test_two_replicas_send_a_shared_prefix_where_the_other_sent_it() -> None:
    async with replica_stack(replicas=2) as stack:
        same, replicas = await pairs_on_one_pod(stack, 8)
        assert (0, 1) in replicas or (1, 0) in replicas  # pairs did cross replicas
        assert same == 8
        rounds = [p.shared.rounds for p in stack.pickers if p.shared is not None]
        assert len(rounds) == 2 and min(rounds) > 10


async def test_without_the_store_each_replica_knows_only_its_own_picks() -> None:
    # The control for the test above: the same trace, no shared state.
    async with replica_stack(replicas=2, shared=False) as stack:
        same, replicas = await pairs_on_one_pod(stack, 8)
        crossing = {(0, 1), (1, 0)} & replicas
        assert crossing and same < 8


async def test_each_replica_counts_the_others_requests_in_flight() -> None:
    slow = profile("fast").with_overrides(decode_base_s=0.01)
    async with replica_stack(replicas=2, params=slow) as stack, aiohttp.ClientSession() as s:
        long = []
        for i in range(4):  # a few sharing rounds apart: each picker sees what the other placed
            long.append(asyncio.create_task(post(s, f"{stack.url}/v1/completions",
                                                 completion_body(f"long {i}", max_tokens=300))))
            await asyncio.sleep(0.2)

        async def both_count_four() -> bool:
            own = [sum(p.store.own_inflight.values()) for p in stack.pickers]
            seen = [sum(p.store.inflight.values()) for p in stack.pickers]
            return sum(own) == 4 and all(own) and seen == [4, 4]

        await wait_until(both_count_four, 5, "every replica counting all four requests")
        # And the four spread over the four pods, as one picker spreads them.
        served = [(await t)[1]["x-sim-server"] for t in long]
        assert sorted(served) == sorted(stack.addresses)

        async def none_left() -> bool:
            return [sum(p.store.inflight.values()) for p in stack.pickers] == [0, 0]

        await wait_until(none_left, 5, "the counts back to zero")


async def test_the_store_down_and_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "epp.sharedstate")
    async with replica_stack(replicas=2, staleness=0.5) as stack, aiohttp.ClientSession() as s:
        a = stack.pickers[0]
        assert a.shared is not None and stack.redis is not None
        await wait_until(lambda: _peers(stack, 1), 5, "each replica seeing the other")
        stack.redis.stop()
        await wait_until(lambda: _up(stack, 0), 5, "both replicas noticing the outage")
        assert any("unreachable" in r.getMessage() for r in caplog.records)
        await wait_until(lambda: _peers(stack, 0), 5, "the peers dropped after the staleness bound")
        assert a.store.inflight is a.store.own_inflight  # routing on its own state alone
        for i in range(6):  # requests are served meanwhile
            status, _, data = await post(s, f"{stack.url}/v1/completions", completion_body(f"while down {i}"))
            assert status == 200, data
        metrics = await (await s.get(f"http://127.0.0.1:{a.bound_ports['metrics']}/metrics")).text()
        assert "epp_shared_state_up 0.0" in metrics and "epp_shared_state_errors_total" in metrics
        await stack.redis.start()  # an empty store on the same address
        await wait_until(lambda: _up(stack, 1), 5, "both replicas sharing again")
        await wait_until(lambda: _peers(stack, 1), 5, "each replica seeing the other again")
        assert any("sharing again" in r.getMessage() for r in caplog.records)
        same, _ = await pairs_on_one_pod(stack, 4)
        assert same == 4


async def _up(stack: ReplicaStack, value: int) -> bool:
    return all(p.shared is not None and p.shared.up is bool(value) for p in stack.pickers)


async def _peers(stack: ReplicaStack, n: int) -> bool:
    return all(p.shared is not None and len(p.shared.peers.replicas()) == n for p in stack.pickers)


async def test_a_replica_that_stops_cleanly_leaves_at_once() -> None:
    async with replica_stack(replicas=2, staleness=30) as stack:
        await wait_until(lambda: _peers(stack, 1), 5, "each replica seeing the other")
        gone = stack.pickers.pop()
        await gone.stop(grace=0.1)
        # Well within the 30 s staleness bound: the replica removed its own load as it stopped.
        await wait_until(lambda: _peers(stack, 0), 5, "the other dropping it")


async def test_killing_a_replica_under_load_fails_only_what_it_held() -> None:
    """Envoy's gRPC retry (connect failures, on another host) and outlier detection move new
    ext_proc streams to the survivor: only requests the killed replica already held fail."""
    async with replica_stack(replicas=2) as stack, aiohttp.ClientSession() as s:
        results: list[tuple[float, float, int | str]] = []
        killed: list[float] = []
        stop_at = asyncio.get_running_loop().time() + 3.0

        async def client(w: int) -> None:
            loop, i = asyncio.get_running_loop(), 0
            while loop.time() < stop_at:
                started = loop.time()
                try:
                    status: int | str = (await post(s, f"{stack.url}/v1/completions",
                                                    completion_body(f"client {w} request {i}", max_tokens=4)))[0]
                except aiohttp.ClientError as e:
                    status = type(e).__name__
                results.append((started, loop.time(), status))
                i += 1

        async def kill() -> None:
            await asyncio.sleep(1.0)
            killed.append(asyncio.get_running_loop().time())
            await stack.pickers[0].stop(grace=0)

        await asyncio.gather(*(client(w) for w in range(4)), kill())
        after = [r for r in results if r[0] >= killed[0]]
        assert len(after) > 100 and [r for r in after if r[2] != 200] == []
        assert all(r[2] == 200 for r in results if r[1] < killed[0])
        survivor = stack.pickers[1]
        await wait_until(lambda: _alone(survivor), 5, "the survivor dropping the killed replica")


async def _alone(picker: PickerServer) -> bool:
    return picker.shared is not None and picker.shared.peers.replicas() == []
