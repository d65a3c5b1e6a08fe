"""epp discovering its pool through the Kubernetes API emulator, behind a real Envoy, in front of
the simulated fleet (the emulator's pods point at the simulator's ports)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from epp.datastore.kubernetes import KubernetesOptions
from epp.stack.local import free_ports, in_process_stack, wait_until
from tests.k8s_emulator import KubeEmulator
from tests.unit.test_kubernetes_discovery import NS, PODS, POOL, pod, pool

from .conftest import completion_body, post


@pytest.fixture
async def emulator() -> AsyncIterator[KubeEmulator]:
    emu = KubeEmulator(bookmark_interval=0.5)
    await emu.start()
    yield emu
    await emu.stop()


def sim_pod(name: str, port: int, **kw: Any) -> dict[str, Any]:
    """A pod on 127.0.0.1 whose active port is one simulator server's."""
    return pod(name, "127.0.0.1", annotations={"inference.networking.k8s.io/active-ports": str(port)}, **kw)


async def test_routes_to_the_pools_ready_pods_and_follows_changes(emulator: KubeEmulator, tmp_path: Path) -> None:
    ports = free_ports(3)
    await emulator.apply(*POOL, pool(ports=tuple(ports)))
    for i, p in enumerate(ports):
        await emulator.apply(*PODS, sim_pod(f"vllm-{i}", p))
    kube = KubernetesOptions(namespace=NS, pool_name="vllm-pool",
                             kubeconfig=emulator.write_kubeconfig(tmp_path / "kubeconfig", NS))
    async with in_process_stack(servers=3, kubernetes=kube, ports=ports) as stack, aiohttp.ClientSession() as s:
        assert stack.picker is not None
        assert sorted(stack.picker.store.addresses()) == sorted(f"127.0.0.1:{p}" for p in ports)
        seen = Counter()
        for i in range(30):
            status, headers, _ = await post(s, f"{stack.url}/v1/completions", completion_body(f"k8s {i}"))
            assert status == 200
            seen[headers["x-sim-server"]] += 1
        assert len(seen) == 3
        # vllm-1 stops being Ready: no request may reach it once epp has seen the change.
        await emulator.apply(*PODS, sim_pod("vllm-1", ports[1], ready=False))
        gone = f"127.0.0.1:{ports[1]}"
        picker = stack.picker

        async def removed() -> bool:
            return gone not in picker.store.addresses()

        await wait_until(removed, 5, "the unready pod to leave the pool")
        for i in range(20):
            status, headers, _ = await post(s, f"{stack.url}/v1/completions", completion_body(f"after {i}"))
            assert status == 200 and headers["x-sim-server"] != gone
        # The pool is deleted: every request gets a clear 503.
        await emulator.delete(*POOL, NS, "vllm-pool")

        async def empty() -> bool:
            return not picker.store.addresses()

        await wait_until(empty, 5, "no endpoints")
        status, _, body = await post(s, f"{stack.url}/v1/completions", completion_body("no pool"))
        assert status == 503 and b"no endpoints" in body
