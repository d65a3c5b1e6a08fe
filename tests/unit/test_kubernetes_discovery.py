"""Kubernetes discovery with kubernetes-asyncio against the in-process API emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s_client

from epp.datastore.kubernetes import KubernetesDiscovery, PoolError, PoolSpec, api_client, pod_endpoints
from epp.datastore.store import Datastore
from epp.stack.local import wait_until
from tests.k8s_emulator import KubeEmulator

NS = "llm"
POOL = ("inference.networking.k8s.io", "v1", "inferencepools")
PODS = ("", "v1", "pods")


def pod(name: str, ip: str | None, *, ready: bool = True, labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None, terminating: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS, "labels": labels or {"app": "vllm"}}
    if annotations:
        meta["annotations"] = annotations
    if terminating:
        meta["deletionTimestamp"] = "2026-11-23T10:00:00Z"
    status: dict[str, Any] = {"phase": "Running",
                              "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "vllm"}]},
            "status": status}


def pool(name: str = "vllm-pool", labels: dict[str, str] | None = None,
         ports: tuple[int, ...] = (8000,)) -> dict[str, Any]:
    return {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"matchLabels": labels or {"app": "vllm"}},
                     "targetPorts": [{"number": p} for p in ports],
                     "endpointPickerRef": {"name": "epp", "port": {"number": 9002}, "failureMode": "FailClose"}}}


@pytest.fixture
async def emulator() -> AsyncIterator[KubeEmulator]:
    emu = KubeEmulator(bookmark_interval=0.2)
    await emu.start()
    yield emu
    await emu.stop()


def client_for(emu: KubeEmulator) -> k8s_client.ApiClient:
    conf = k8s_client.Configuration()
    conf.host = f"http://127.0.0.1:{emu.port}"
    return k8s_client.ApiClient(conf)


async def endpoints_are(store: Datastore, expected: list[str], what: str = "endpoints") -> None:
    async def check() -> bool:
        return sorted(store.addresses()) == sorted(expected)

    try:
        await wait_until(check, 5, what)
    except TimeoutError:
        raise AssertionError(f"{what}: have {sorted(store.addresses())}, want {sorted(expected)}") from None


@pytest.fixture
async def discovery(emulator: KubeEmulator) -> AsyncIterator[tuple[KubernetesDiscovery, Datastore]]:
    store = Datastore()
    d = KubernetesDiscovery(client_for(emulator), store, NS, pool_name="vllm-pool", watch_timeout=30)
    await d.start()
    yield d, store
    await d.stop()


async def test_pool_and_pod_lifecycle(emulator: KubeEmulator, discovery: tuple[KubernetesDiscovery, Datastore]) -> None:
    _d, store = discovery
    await emulator.apply(*PODS, pod("a", "10.0.0.1"))
    await emulator.apply(*PODS, pod("other", "10.0.0.9", labels={"app": "web"}))
    await endpoints_are(store, [], "no pool yet: no endpoints")
    await emulator.apply(*POOL, pool())
    await endpoints_are(store, ["10.0.0.1:8000"], "the pool's pods")
    await emulator.apply(*PODS, pod("b", None, ready=False))  # scheduled, no IP yet
    await emulator.apply(*PODS, pod("b", "10.0.0.2", ready=False))
    await endpoints_are(store, ["10.0.0.1:8000"], "unready pod excluded")
    await emulator.apply(*PODS, pod("b", "10.0.0.2"))
    await endpoints_are(store, ["10.0.0.1:8000", "10.0.0.2:8000"], "pod became ready")
    await emulator.apply(*PODS, pod("a", "10.0.0.1", terminating=True))
    await endpoints_are(store, ["10.0.0.2:8000"], "terminating pod leaves at once")
    await emulator.delete(*PODS, NS, "a")
    await emulator.apply(*POOL, pool(ports=(8000, 8001)))
    await endpoints_are(store, ["10.0.0.2:8000", "10.0.0.2:8001"], "two target ports")
    names = {e.address: e.name for e in store.snapshot().endpoints}  # as the reference names them
    assert names == {"10.0.0.2:8000": f"{NS}/b-rank-0", "10.0.0.2:8001": f"{NS}/b-rank-1"}
    await emulator.apply(*PODS, pod("b", "10.0.0.2", annotations={"inference.networking.k8s.io/active-ports": "8001"}))
    await endpoints_are(store, ["10.0.0.2:8001"], "active-ports annotation narrows")
    await emulator.apply(*POOL, pool(labels={"app": "web"}))
    await endpoints_are(store, ["10.0.0.9:8000"], "selector change")
    await emulator.delete(*POOL, NS, "vllm-pool")
    await endpoints_are(store, [], "pool deleted")


async def test_a_dropped_watch_resumes_from_its_resource_version(
        emulator: KubeEmulator, discovery: tuple[KubernetesDiscovery, Datastore]) -> None:
    _d, store = discovery
    await emulator.apply(*POOL, pool())
    await emulator.apply(*PODS, pod("a", "10.0.0.1"))
    await endpoints_are(store, ["10.0.0.1:8000"])

    async def both_watching() -> bool:  # the pool's and the pods' watches (the second can lag)
        return emulator.watch_count >= 2

    await wait_until(both_watching, 5, "both watches open")
    lists, watches = emulator.list_count, emulator.watch_count
    await emulator.drop_watches()
    await emulator.apply(*PODS, pod("b", "10.0.0.2"))  # while the watches are down
    await emulator.delete(*PODS, NS, "a")
    await endpoints_are(store, ["10.0.0.2:8000"], "changes made during the drop")
    assert emulator.list_count == lists  # resumed, not relisted
    assert emulator.watch_count >= watches + 2  # both watches came back
    resumed = [r for r in emulator.requests[-4:] if "watch=True" in r]
    assert resumed and all("resourceVersion=" in r for r in resumed)


async def test_410_gone_relists_and_forgets_what_was_deleted_meanwhile(
        emulator: KubeEmulator, discovery: tuple[KubernetesDiscovery, Datastore]) -> None:
    d, store = discovery
    await emulator.apply(*POOL, pool())
    for i in range(3):
        await emulator.apply(*PODS, pod(f"p{i}", f"10.0.0.{i + 1}"))
    await endpoints_are(store, ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"])
    assert d.pods is not None
    relists = d.pods.relists
    await emulator.drop_watches()
    await emulator.delete(*PODS, NS, "p0")
    await emulator.apply(*PODS, pod("p3", "10.0.0.4"))
    emulator.compact()  # the history of the gap is gone: resuming gets 410
    await endpoints_are(store, ["10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"], "state after relist")
    assert d.pods.relists > relists
    assert "Expired" not in str(store.addresses())
    # Still watching after the relist:
    await emulator.apply(*PODS, pod("p1", "10.0.0.2", ready=False))
    await endpoints_are(store, ["10.0.0.3:8000", "10.0.0.4:8000"], "watching after relist")


async def test_bookmarks_advance_the_resume_point(emulator: KubeEmulator,
                                                  discovery: tuple[KubernetesDiscovery, Datastore]) -> None:
    d, store = discovery
    await emulator.apply(*POOL, pool())
    await emulator.apply(*PODS, pod("a", "10.0.0.1"))
    await endpoints_are(store, ["10.0.0.1:8000"])
    assert d.pods is not None
    before = int(d.pods.resource_version or 0)
    for i in range(5):  # changes the pod watch does not select
        await emulator.apply(*PODS, pod(f"web{i}", f"10.1.0.{i}", labels={"app": "web"}))

    async def advanced() -> bool:
        return d.pods is not None and int(d.pods.resource_version or 0) >= before + 5

    await wait_until(advanced, 5, "a bookmark")
    assert any("allowWatchBookmarks=True" in r for r in emulator.requests)


async def test_api_errors_back_off_and_recover(emulator: KubeEmulator) -> None:
    emulator.fail_next = [500, 503, 403]
    await emulator.apply(*POOL, pool())
    await emulator.apply(*PODS, pod("a", "10.0.0.1"))
    store = Datastore()
    d = KubernetesDiscovery(client_for(emulator), store, NS, pool_name="vllm-pool", watch_timeout=30)
    await d.start()
    try:
        await endpoints_are(store, ["10.0.0.1:8000"], "recovery after API errors")
    finally:
        await d.stop()


async def test_a_bad_pool_spec_keeps_the_previous_endpoints(
        emulator: KubeEmulator, discovery: tuple[KubernetesDiscovery, Datastore]) -> None:
    d, store = discovery
    await emulator.apply(*POOL, pool())
    await emulator.apply(*PODS, pod("a", "10.0.0.1"))
    await endpoints_are(store, ["10.0.0.1:8000"])
    bad = pool()
    bad["spec"]["targetPorts"] = []
    await emulator.apply(*POOL, bad)

    async def flagged() -> bool:
        return d.pool_error is not None and "targetPorts" in d.pool_error

    await wait_until(flagged, 5, "the pool error")
    assert store.addresses() == ["10.0.0.1:8000"]


async def test_standalone_selector_mode_and_kubeconfig(emulator: KubeEmulator, tmp_path: Path) -> None:
    kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig", NS)
    await emulator.apply(*PODS, pod("a", "10.0.0.1", labels={"app": "vllm", "tier": "gpu"}))
    await emulator.apply(*PODS, pod("b", "10.0.0.2", labels={"app": "vllm"}))
    store = Datastore()
    d = KubernetesDiscovery(await api_client(kubeconfig), store, NS, selector="app=vllm,tier=gpu",
                            target_ports=(8000, 8002))
    await d.start()
    try:
        await endpoints_are(store, ["10.0.0.1:8000", "10.0.0.1:8002"], "selector mode")
    finally:
        await d.stop()


def test_pool_spec_errors_name_the_field() -> None:
    with pytest.raises(PoolError, match=r"matchLabels"):
        PoolSpec.parse({"spec": {"selector": {}, "targetPorts": [{"number": 1}]}})
    with pytest.raises(PoolError, match=r"targetPorts\[1\]\.number"):
        PoolSpec.parse(pool(ports=(8000, 0)))
    with pytest.raises(PoolError, match=r"1 to 8"):
        PoolSpec.parse(pool(ports=tuple(range(8000, 8009))))
    spec = PoolSpec.parse(pool(ports=(8000, 8001)))
    assert spec.label_selector == "app=vllm" and spec.failure_mode == "FailClose"
    assert pod_endpoints(pod("x", "fd00::5"), (8000,)) == ["[fd00::5]:8000"]


async def test_in_cluster_config_uses_the_service_account_over_tls(tmp_path: Path) -> None:
    from epp.server.tls import self_signed

    key, crt = self_signed()
    emu = KubeEmulator()
    await emu.start(tls=(key, crt))
    try:
        sa = tmp_path / "serviceaccount"
        sa.mkdir()
        (sa / "token").write_text("in-cluster-token")
        (sa / "ca.crt").write_bytes(crt)
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(emu.port)}
        await emu.apply(*POOL, pool())
        await emu.apply(*PODS, pod("a", "10.0.0.1"))
        store = Datastore()
        api = await api_client(None, service_account_dir=str(sa), environ=env)
        d = KubernetesDiscovery(api, store, NS, pool_name="vllm-pool")
        await d.start()
        try:
            await endpoints_are(store, ["10.0.0.1:8000"], "discovery with the in-cluster config")
        finally:
            await d.stop()
        assert "Bearer in-cluster-token" in emu.authorizations
    finally:
        await emu.stop()


async def test_objectives_crds_not_installed_do_not_disturb_discovery(emulator: KubeEmulator) -> None:
    emulator.not_served = {"inferenceobjectives", "inferencemodelrewrites"}
    seen: list[Any] = []
    store = Datastore()
    d = KubernetesDiscovery(client_for(emulator), store, NS, pool_name="vllm-pool", on_policies=seen.append)
    await d.start()
    try:
        await emulator.apply(*POOL, pool())
        await emulator.apply(*PODS, pod("a", "10.0.0.1"))
        await endpoints_are(store, ["10.0.0.1:8000"], "discovery without the objective CRDs")

        async def waiting_quietly() -> bool:
            return all(r.synced.is_set() for r in d.policy_reflectors)

        await wait_until(waiting_quietly, 5, "the policy reflectors to note the missing CRDs")
        asked = [r for r in emulator.requests if "inferenceobjectives" in r]
        assert len(asked) == 2 and not seen  # one try per group, then a 30 s pause; no policies applied
    finally:
        await d.stop()


async def test_endpoints_carry_their_pods_labels_and_follow_relabelling(
        emulator: KubeEmulator, discovery: tuple[KubernetesDiscovery, Datastore]) -> None:
    _d, store = discovery
    await emulator.apply(*POOL, pool())
    await emulator.apply(*PODS, pod("a", "10.0.0.1", labels={"app": "vllm", "llm-d.ai/role": "prefill"}))
    await endpoints_are(store, ["10.0.0.1:8000"])

    def role() -> str | None:
        state = store.get("10.0.0.1:8000")
        return state.labels.get("llm-d.ai/role") if state is not None else None

    assert role() == "prefill"
    await emulator.apply(*PODS, pod("a", "10.0.0.1", labels={"app": "vllm", "llm-d.ai/role": "decode"}))

    async def relabelled() -> bool:
        return role() == "decode"

    await wait_until(relabelled, 5, "the new label on the endpoint")
    assert store.snapshot().endpoints[0].labels["llm-d.ai/role"] == "decode"
