"""epp discovering its pool through the Kubernetes API emulator, behind a real Envoy, in front of
the simulated fleet (the emulator's pods point at the simulator's ports)."""

from __future__ import annotations

import asyncio
import json
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


POLICY = ("inference.networking.x-k8s.io", "v1alpha2")


async def test_objectives_and_rewrites_from_the_api(emulator: KubeEmulator, tmp_path: Path) -> None:
    from epp.sim.profiles import profile

    ports = free_ports(2)
    await emulator.apply(*POOL, pool(ports=tuple(ports)))
    for i, p in enumerate(ports):
        await emulator.apply(*PODS, sim_pod(f"vllm-{i}", p))
    await emulator.apply(*POLICY, "inferenceobjectives", {
        "kind": "InferenceObjective", "metadata": {"name": "batch", "namespace": NS},
        "spec": {"priority": -10, "poolRef": {"name": "vllm-pool"}}})
    await emulator.apply(*POLICY, "inferenceobjectives", {  # another pool's: ignored
        "kind": "InferenceObjective", "metadata": {"name": "chat", "namespace": NS},
        "spec": {"priority": -1, "poolRef": {"name": "other-pool"}}})
    kube = KubernetesOptions(namespace=NS, pool_name="vllm-pool",
                             kubeconfig=emulator.write_kubeconfig(tmp_path / "kubeconfig", NS))
    params = profile("fast").with_overrides(served_model_names=("sim-model", "sim-model-v2"))
    async with in_process_stack(servers=2, kubernetes=kube, ports=ports, params=params) as stack, \
            aiohttp.ClientSession() as s:
        picker = stack.picker
        assert picker is not None

        async def loaded() -> bool:
            return picker.director.policies.priority("batch") == -10

        await wait_until(loaded, 5, "the objectives")
        assert picker.director.policies.priority("chat") == 0
        # A rewrite created while serving applies to the next requests.
        await emulator.apply(*POLICY, "inferencemodelrewrites", {
            "kind": "InferenceModelRewrite", "metadata": {"name": "v2", "namespace": NS},
            "spec": {"poolRef": {"name": "vllm-pool"},
                     "rules": [{"matches": [{"model": {"type": "Exact", "value": "sim-model"}}],
                                "targets": [{"modelRewrite": "sim-model-v2"}]}]}})

        async def rewriting() -> bool:
            return bool(picker.director.policies.exact)

        await wait_until(rewriting, 5, "the rewrite")
        status, _, data = await post(s, f"{stack.url}/v1/completions", completion_body("rewrite me"))
        assert status == 200 and b'"sim-model-v2"' in data
        for addr in stack.addresses:
            await stack.server(addr).apply_admin({"pin": {"num_requests_waiting": 500}})

        async def saturated() -> bool:
            snap = picker.store.snapshot()
            return all(e.signals is not None and e.signals.waiting >= 500 for e in snap.endpoints)

        await wait_until(saturated, 5, "saturation seen by epp")
        batch = {"x-gateway-inference-objective": "batch"}
        status, _, _ = await post(s, f"{stack.url}/v1/completions", completion_body("shed me"), headers=batch)
        assert status == 429
        status, _, _ = await post(s, f"{stack.url}/v1/completions", completion_body("keep me"))
        assert status == 200


async def _ready(picker: Any) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{picker.bound_ports['health']}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="readiness"),
                                                          timeout=2)
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


async def test_two_replicas_elect_one_ready_leader_and_fail_over(emulator: KubeEmulator, tmp_path: Path) -> None:
    from epp.config import load_config
    from epp.server.app import PickerServer, ServeOptions
    from epp.sim.fleet import Fleet
    from epp.sim.profiles import profile

    ports = free_ports(2)
    await emulator.apply(*POOL, pool(ports=tuple(ports)))
    for i, p in enumerate(ports):
        await emulator.apply(*PODS, sim_pod(f"vllm-{i}", p))
    kube = KubernetesOptions(namespace=NS, pool_name="vllm-pool", leader_election=True, lease_duration=1.0,
                             renew_deadline=0.6, retry_period=0.1,
                             kubeconfig=emulator.write_kubeconfig(tmp_path / "kubeconfig", NS))
    fleet = Fleet(ports, profile("fast"))
    await fleet.start()
    replicas = []
    try:
        for _ in range(2):
            own = free_ports(3)
            r = PickerServer(ServeOptions(config=load_config(None), kubernetes=kube, host="127.0.0.1",
                                          grpc_port=own[0], grpc_health_port=own[1], metrics_port=own[2],
                                          secure_serving=False))
            await r.start()
            replicas.append(r)

        async def one_ready() -> bool:
            states = [await _ready(r) for r in replicas]
            return states.count(True) == 1

        await wait_until(one_ready, 10, "exactly one ready replica")
        ready = [await _ready(r) for r in replicas]
        leader, standby = (replicas[0], replicas[1]) if ready[0] else (replicas[1], replicas[0])
        async def warm() -> bool:  # the standby discovers and scrapes too, it is just not ready
            return standby.store.fresh_count() == 2 and not await _ready(standby)

        await wait_until(warm, 5, "the standby to be warm and not ready")
        await leader.stop(grace=0.1)  # a rolling update: the leader hands the lease back
        replicas.remove(leader)

        async def standby_ready() -> bool:
            return await _ready(standby)

        try:
            # Released lease: one retry period (0.1 s) + a readiness tick (0.25 s); expired: 1 s more.
            await wait_until(standby_ready, 10, "the standby to become the ready leader")
        except TimeoutError:
            lease = emulator.get("coordination.k8s.io", "v1", "leases", NS, "epp-vllm-pool")
            elector = standby.elector
            state = {"lease": lease and lease["spec"], "leader": elector and elector.is_leader,
                     "fresh": standby.store.fresh_count()}
            raise AssertionError(f"standby not ready: {state}") from None
    finally:
        for r in replicas:
            await r.stop(grace=0.1)
        await fleet.stop()


async def test_epp_serve_cli_discovers_the_pool_and_rejects_bad_flags(emulator: KubeEmulator, tmp_path: Path) -> None:
    """The command line a Deployment runs: `epp serve --pool-name ... --kubeconfig ...`."""
    import subprocess

    from epp.bench.procs import stop
    from epp.sim.fleet import Fleet
    from epp.sim.profiles import profile
    from epp.stack.local import epp_command, spawn

    ports = free_ports(2)
    await emulator.apply(*POOL, pool(ports=tuple(ports)))
    for i, p in enumerate(ports):
        await emulator.apply(*PODS, sim_pod(f"vllm-{i}", p))
    kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig", NS)
    fleet = Fleet(ports, profile("fast"))
    await fleet.start()
    grpc_port, health, metrics = free_ports(3)
    proc = spawn(epp_command("serve", "--pool-name", "vllm-pool", "--pool-namespace", NS, "--kubeconfig", kubeconfig,
                             "--secure-serving=false", "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
                             "--grpc-health-port", str(health), "--metrics-port", str(metrics),
                             "--ha-enable-leader-election=true"), tmp_path / "epp.log")
    try:
        async def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "epp.log").read_text()[-2000:]
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{metrics}/metrics") as r:
                return 'inference_pool_ready_pods{name="vllm-pool"} 2.0' in await r.text()

        await wait_until(ready, 20, "epp serve to discover the pool's two pods")
        lease = emulator.get("coordination.k8s.io", "v1", "leases", NS, "epp-vllm-pool")
        assert lease is not None and lease["spec"]["holderIdentity"]
    finally:
        stop(proc)
        await fleet.stop()
    for bad, message in ((["--endpoint-selector", "app=vllm"], "--endpoint-target-ports"),
                         (["--endpoints", "127.0.0.1:1", "--ha-enable-leader-election=true"], "Kubernetes discovery"),
                         ([], "--pool-name")):
        out = await asyncio.to_thread(subprocess.run, epp_command("serve", *bad), capture_output=True, text=True,
                                      timeout=60)
        assert out.returncode == 2 and message in out.stderr, (bad, out.stderr)


CHART_CONFIG = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "chart-default-plugins.yaml"


async def _health(port: int, service: str) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            status: int = (await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5)).status
        except grpc.aio.AioRpcError:
            return -1  # not listening yet
        return status


@pytest.mark.parametrize("replicas", [1, 2])
async def test_the_reference_charts_arguments_start_epp(emulator: KubeEmulator, tmp_path: Path, replicas: int) -> None:
    """The container args llm-d-router's chart renders (routerlib _deployment.yaml, pool mode): no
    `serve`, `--zap-encoder json`, `--tracing=false`, `--metrics-endpoint-auth=false`, and with more
    than one replica a bare `--ha-enable-leader-election`. Extra flags come as `--key=value`, as the
    chart renders router.epp.flags; the probes ask the services the chart's probes ask."""
    from epp.bench.procs import stop
    from epp.server.health import SERVING
    from epp.sim.fleet import Fleet
    from epp.sim.profiles import profile
    from epp.stack.local import spawn

    ports = free_ports(2)
    await emulator.apply(*POOL, pool(ports=tuple(ports)))
    for i, p in enumerate(ports):
        await emulator.apply(*PODS, pod(f"vllm-{i}", "127.0.0.1", annotations={"llm-d.ai/active-ports": str(p)}))
    config = tmp_path / "default-plugins.yaml"
    config.write_text(CHART_CONFIG.read_text())  # the chart's own default config, data layer included
    fleet = Fleet(ports, profile("fast"))
    await fleet.start()
    grpc_port, health, metrics = free_ports(3)
    args = ["--pool-name", "vllm-pool", "--pool-namespace", NS, "--pool-group", "inference.networking.k8s.io",
            "--zap-encoder", "json", "--config-file", str(config)]
    if replicas > 1:
        args.append("--ha-enable-leader-election")
    args += ["--grpc-health-port", str(health), f"--grpc-port={grpc_port}", f"--metrics-port={metrics}",
             "--host=127.0.0.1", f"--kubeconfig={emulator.write_kubeconfig(tmp_path / 'kubeconfig', NS)}",
             "--v=2", "--tracing=false", "--metrics-endpoint-auth=false"]
    import sys

    proc = spawn([sys.executable, "-m", "epp.cli", *args], tmp_path / "epp.log")
    services = ("liveness", "readiness") if replicas > 1 else ("inference-extension", "inference-extension")
    try:
        async def probes_pass() -> bool:
            assert proc.poll() is None, (tmp_path / "epp.log").read_text()[-2000:]
            return all([await _health(health, s) == SERVING for s in services])

        await wait_until(probes_pass, 20, f"the chart's probes ({services}) to pass")

        async def both_ready() -> bool:  # ready takes one fresh pod; the other's first scrape may come later
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{metrics}/metrics") as r:
                return 'inference_pool_ready_pods{name="vllm-pool"} 2.0' in await r.text()

        await wait_until(both_ready, 10, "both pods in the pool's ready gauge")
    finally:
        stop(proc)
        await fleet.stop()
    log_lines = [line for line in (tmp_path / "epp.log").read_text().splitlines() if line.startswith("{")]
    assert log_lines and all(json.loads(line)["level"] in ("debug", "info", "warn", "error") for line in log_lines)


async def test_metrics_auth_asks_the_api_server_who_may_read(emulator: KubeEmulator, tmp_path: Path) -> None:
    """--metrics-endpoint-auth without a token file, in a cluster: TokenReview, then a
    SubjectAccessReview of `get /metrics`, as the reference (controller-runtime's filter)."""
    ports = free_ports(2)
    await emulator.apply(*POOL, pool(ports=tuple(ports)))
    for i, p in enumerate(ports):
        await emulator.apply(*PODS, sim_pod(f"vllm-{i}", p))
    emulator.tokens = {"prom-token": ("system:serviceaccount:monitoring:prometheus", ["system:serviceaccounts"]),
                       "other-token": ("system:serviceaccount:default:someone", [])}
    emulator.allowed = {("system:serviceaccount:monitoring:prometheus", "get", "/metrics")}
    kube = KubernetesOptions(namespace=NS, pool_name="vllm-pool",
                             kubeconfig=emulator.write_kubeconfig(tmp_path / "kubeconfig", NS))
    serve = {"metrics_token_review": True}
    async with in_process_stack(servers=2, kubernetes=kube, ports=ports, serve=serve) as stack, \
            aiohttp.ClientSession() as s:
        assert stack.picker is not None
        url = f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}/metrics"
        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                ({"Authorization": "Bearer other-token"}, 403),
                                ({"Authorization": "Bearer prom-token"}, 200)):
            async with s.get(url, headers=headers) as r:
                assert r.status == status, (headers, await r.text())
                if status != 200:
                    assert (await r.json())["error"]["code"] == status
        reviews = len(emulator.reviews)
        async with s.get(url, headers={"Authorization": "Bearer prom-token"}) as r:  # cached: no new review
            assert r.status == 200 and len(emulator.reviews) == reviews


async def test_epp_gateway_follows_an_inference_pool(emulator: KubeEmulator, tmp_path: Path) -> None:
    """servers.pool: the gateway's picker discovers the pool's pods and writes them to Envoy's EDS
    file, so a pod that joins the pool takes traffic through the gateway, and one that leaves stops."""
    from epp.stack.local import gateway_stack

    kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig", NS)

    async def register(fleet: Any) -> None:
        ports = tuple(s.port for s in fleet.servers)
        await emulator.apply(*POOL, pool(ports=ports))
        await emulator.apply(*PODS, sim_pod("vllm-0", ports[0]))

    cfg = f"servers: {{pool: {{name: vllm-pool, namespace: {NS}, kubeconfig: {kubeconfig}}}}}\n"
    async with gateway_stack(cfg, servers=2, workdir=tmp_path / "gw", before=register) as stack, \
            aiohttp.ClientSession() as s:
        first, second = stack.fleet.servers
        url = f"{stack.url}/v1/completions"
        for i in range(3):
            status, headers, _ = await post(s, url, completion_body(f"pool {i}"))
            assert status == 200 and headers["x-sim-server"] == first.address
        await emulator.apply(*PODS, sim_pod("vllm-1", second.port))
        await first.apply_admin({"drain": True})  # only the new pod can answer

        async def second_serves() -> bool:
            status, headers, _ = await post(s, url, completion_body("joined"))
            return status == 200 and headers["x-sim-server"] == second.address

        await wait_until(second_serves, 15, "the pod that joined to serve through the gateway")
