"""The Envoy bootstrap of ``epp gateway``, from the template envoy/gateway.yaml.

The template holds every fixed choice; this module fills in what the gateway config says. Values
are placed as YAML nodes (never pasted into text), so a path or an address cannot change the
structure; `envoy --mode validate` in the tests is the final word on the result.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from epp.gateway.config import GatewayConfig, Listener
from epp.gateway.envoyproc import envoy_dir

CLUSTER = "inference_pool"
TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
LOAD_ASSIGNMENT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def _fill(node: Any, values: dict[str, Any]) -> Any:
    """``node`` with every string scalar that names a placeholder replaced by its value."""
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if isinstance(node, str) and node in values:
        return values[node]
    return node


def socket_address(address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def load_assignment(addresses: list[str] | tuple[str, ...]) -> dict[str, Any]:
    return {"cluster_name": CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(a)}} for a in addresses]}]}


def eds_document(addresses: list[str] | tuple[str, ...], version: int) -> str:
    """The file Envoy's filesystem EDS reads: the pool's endpoints as the picker knows them."""
    doc = {"version_info": str(version),
           "resources": [{"@type": LOAD_ASSIGNMENT, **load_assignment(addresses)}]}
    return yaml.safe_dump(doc, sort_keys=False)


def timeouts(cfg: GatewayConfig, longest_wait: float) -> dict[str, float]:
    """The timeout chain in seconds. ``longest_wait``: the longest a request may wait in the
    picker (flow control's TTLs). Per attempt, the model server may be silent ``upstreamIdle``;
    the client's stream and the picker's stream outlast every attempt plus the wait."""
    t, r, k = cfg.timeouts, cfg.retries, cfg.scale
    attempts_time = r.attempts * (t.connect + t.upstream_idle + r.backoff * 10)
    stream_idle = longest_wait + attempts_time + 10.0 * k
    picker = t.picker or max(t.request + longest_wait, 86400.0 * k, stream_idle)
    return {"stream_idle": stream_idle, "picker": picker, "message": max(120.0 * k, longest_wait + 10.0 * k)}


def sds_file(workdir: Path, index: int) -> Path:
    return workdir / f"tls-{index}.sds.yaml"


def sds_document(x: Listener, index: int) -> str:
    """The file Envoy's filesystem SDS reads for a TLS listener: its certificate and key files,
    re-read when a file is moved into their directory (how cert-manager and Kubernetes Secret
    mounts rotate them), so a renewed certificate is served without a restart."""
    assert x.cert_file is not None and x.key_file is not None
    watched = {"path": str(Path(x.cert_file).resolve().parent)}
    doc = {"resources": [{"@type": SECRET, "name": f"gateway-{index}-cert", "tls_certificate": {
        "certificate_chain": {"filename": x.cert_file}, "private_key": {"filename": x.key_file},
        "watched_directory": watched}}]}
    return yaml.safe_dump(doc, sort_keys=False)


def write_sds(cfg: GatewayConfig, workdir: Path) -> None:
    """The SDS files of the TLS listeners (the bootstrap points at them)."""
    for i, x in enumerate(cfg.listeners):
        if x.tls:
            sds_file(workdir, i).write_text(sds_document(x, i))


def render(cfg: GatewayConfig, *, eds_path: Path | None = None, longest_wait: float = 0.0,
           listen_ports: dict[int, int] | None = None, sds_dir: Path | None = None) -> dict[str, Any]:
    """The bootstrap as a dict. ``eds_path``: where the picker writes the pool's endpoints when they
    are discovered (an endpoints file or a pool); a static list is written in. ``listen_ports``
    maps a listener's configured port to the one to bind (tests bind free ports). ``sds_dir``:
    where ``write_sds`` put the TLS listeners' SDS files (certificates reloaded when they change);
    without it the certificates are read once, at start."""
    template: dict[str, Any] = yaml.safe_load((envoy_dir() / "gateway.yaml").read_text())
    listener_template = template.pop("LISTENER")
    t, r, cb = cfg.timeouts, cfg.retries, cfg.circuit_breaker
    chain = timeouts(cfg, longest_wait)
    values: dict[str, Any] = {
        "ADMIN_PORT": cfg.admin_port, "PICKER_PORT": cfg.picker_port, "PICKER_HEALTH_PORT": cfg.picker_health_port,
        "CONNECT_TIMEOUT": _seconds(t.connect), "FAILURES": cb.consecutive_failures,
        "EJECTION_TIME": _seconds(cb.ejection_time), "STREAM_IDLE": _seconds(chain["stream_idle"]),
        "LISTENER_IDLE": _seconds(t.listener_idle), "REQUEST_TIMEOUT": _seconds(t.request),
        "RETRY_CODES": list(r.status_codes), "RETRIES": r.attempts - 1, "UPSTREAM_IDLE": _seconds(t.upstream_idle),
        "BACKOFF": _seconds(r.backoff), "MAX_BACKOFF": _seconds(r.backoff * 10),
        "PICKER_TIMEOUT": _seconds(chain["picker"]), "MESSAGE_TIMEOUT": _seconds(chain["message"]),
    }
    out: dict[str, Any] = _fill(template, values)
    resources = out["static_resources"]
    pool = next(c for c in resources["clusters"] if c["name"] == CLUSTER)
    if cfg.servers.static:
        pool["type"] = "STATIC"
        pool["load_assignment"] = load_assignment(cfg.servers.static)
    else:
        if eds_path is None:
            raise ValueError("discovered model servers need the picker's endpoints file (eds_path)")
        pool["type"] = "EDS"
        pool["eds_cluster_config"] = {"eds_config": {
            "resource_api_version": "V3",
            "path_config_source": {"path": str(eds_path), "watched_directory": {"path": str(eds_path.parent)}}}}
    ports = listen_ports or {}
    resources["listeners"] = [_listener(listener_template, x, i, ports.get(x.port, x.port), values, sds_dir)
                              for i, x in enumerate(cfg.listeners)]
    return out


def _listener(template: dict[str, Any], x: Listener, index: int, port: int, values: dict[str, Any],
              sds_dir: Path | None) -> dict[str, Any]:
    node: dict[str, Any] = _fill(copy.deepcopy(template), {**values, "LISTENER_NAME": f"gateway-{index}",
                                                          "LISTEN_ADDRESS": x.address, "LISTEN_PORT": port})
    chain = node["filter_chains"][0]
    hcm = chain["filters"][0]["typed_config"]
    if x.http2:
        hcm["http2_protocol_options"] = {"initial_stream_window_size": 1048576,
                                         "initial_connection_window_size": 16777216}
    else:
        hcm["codec_type"] = "HTTP1"
    if x.tls:
        context: dict[str, Any] = {"alpn_protocols": ["h2", "http/1.1"] if x.http2 else ["http/1.1"]}
        if sds_dir is not None:
            path = sds_file(sds_dir, index)
            context["tls_certificate_sds_secret_configs"] = [{"name": f"gateway-{index}-cert", "sds_config": {
                "resource_api_version": "V3",
                "path_config_source": {"path": str(path),
                                       "watched_directory": {"path": str(Path(x.cert_file or "").resolve().parent)}}}}]
        else:
            context["tls_certificates"] = [{"certificate_chain": {"filename": x.cert_file},
                                            "private_key": {"filename": x.key_file}}]
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls",
                                     "typed_config": {"@type": TLS_CONTEXT, "common_tls_context": context}}
    return node


def dump(bootstrap: dict[str, Any]) -> str:
    return yaml.safe_dump(bootstrap, sort_keys=False)
