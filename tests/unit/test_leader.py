"""Leader election on a Lease, against the API emulator (resourceVersion conflicts included)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from epp.leader import LeaderElector
from epp.stack.local import wait_until
from tests.k8s_emulator import KubeEmulator
from tests.unit.test_kubernetes_discovery import client_for

LEASES = ("coordination.k8s.io", "v1", "leases")


@pytest.fixture
async def emulator() -> AsyncIterator[KubeEmulator]:
    emu = KubeEmulator()
    await emu.start()
    yield emu
    for close in emu.cleanups:
        await close()
    await emu.stop()


def elector(emu: KubeEmulator, identity: str, lease: float = 1.0) -> LeaderElector:
    e = LeaderElector(client_for(emu), "llm", "epp-pool", identity, lease_duration=lease, renew_deadline=0.6,
                      retry_period=0.1)
    emu.cleanups.append(e.coord.api_client.close)
    return e


def holder(emu: KubeEmulator) -> str | None:
    lease = emu.get(*LEASES, "llm", "epp-pool")
    return None if lease is None else lease["spec"].get("holderIdentity")


async def test_one_leader_then_a_fast_handover_on_release(emulator: KubeEmulator) -> None:
    a, b = elector(emulator, "a"), elector(emulator, "b")
    a.start()
    await wait_until(lambda: _true(a.is_leader), 3, "a to lead")
    b.start()
    await asyncio.sleep(0.5)
    assert a.is_leader and not b.is_leader and holder(emulator) == "a"
    await a.stop(release=True)  # clean shutdown: the lease is handed back
    await wait_until(lambda: _true(b.is_leader), 0.9, "b to take over before the lease would have expired")
    lease = emulator.get(*LEASES, "llm", "epp-pool")
    assert lease is not None and lease["spec"]["leaseTransitions"] >= 1
    await b.stop()


async def test_a_crashed_leader_is_replaced_after_its_lease_expires(emulator: KubeEmulator) -> None:
    a, b = elector(emulator, "a"), elector(emulator, "b")
    a.start()
    await wait_until(lambda: _true(a.is_leader), 3, "a to lead")
    b.start()
    await a.stop(release=False)  # killed: it stops renewing, the lease stays
    await asyncio.sleep(0.3)
    assert not b.is_leader and holder(emulator) == "a"  # still a's lease: b must wait
    await wait_until(lambda: _true(b.is_leader), 3, "b to take over the expired lease")
    assert holder(emulator) == "b"
    await b.stop()


async def test_racing_replicas_conflict_and_only_one_wins(emulator: KubeEmulator) -> None:
    replicas = [elector(emulator, f"r{i}") for i in range(4)]
    results = await asyncio.gather(*(r.try_acquire_or_renew() for r in replicas))
    assert sum(results) == 1
    winner = replicas[results.index(True)].identity
    assert holder(emulator) == winner
    # The loser renewing later does not steal a live lease.
    loser = replicas[results.index(False)]
    assert not await loser.try_acquire_or_renew()


async def test_a_leader_that_cannot_renew_steps_down(emulator: KubeEmulator) -> None:
    a = elector(emulator, "a")
    changes: list[bool] = []
    a.on_change = changes.append
    a.start()
    await wait_until(lambda: _true(a.is_leader), 3, "a to lead")
    emulator.fail_next = [500] * 30  # the API server is unreachable for a while
    await wait_until(lambda: _true(not a.is_leader), 3, "a to step down")
    await wait_until(lambda: _true(a.is_leader), 6, "a to lead again once the API answers")
    assert changes[:3] == [True, False, True]
    await a.stop()


async def _true(value: bool) -> bool:
    return value
