"""``epp gateway``: the picker in this process, a real Envoy as its child, one config for both.

The picker listens on 127.0.0.1 only (Envoy is its one client). When the model servers are
discovered (an endpoints file, a pool), the picker writes them to the file Envoy's filesystem EDS
watches, so the cluster's members follow discovery; a static list is written into the bootstrap.
Envoy is restarted if it exits (at most five times a minute, then the gateway stops).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from epp.config import DEFAULT_CONFIG, PickerConfig, build, load_config, parse_config
from epp.datastore.store import Datastore
from epp.flowcontrol.controller import FlowSettings
from epp.gateway import envoyproc as envoy_mod
from epp.gateway.bootstrap import dump, eds_document, render, write_sds
from epp.gateway.config import GatewayConfig
from epp.gcpolicy import settle
from epp.server.app import PickerServer, ServeOptions

log = logging.getLogger("epp.gateway")
EDS_FILE = "endpoints.eds.yaml"


def default_picker_config(attempts: int) -> PickerConfig:
    """The default profile, its picker returning one endpoint per attempt (primary + fallbacks)."""
    text = DEFAULT_CONFIG.replace("- type: max-score-picker\n",
                                  f"- type: max-score-picker\n  parameters: {{maxNumOfEndpoints: {attempts}}}\n", 1)
    return parse_config(text, "<gateway default config>")


def longest_wait(flow: FlowSettings | None) -> float:
    """The longest a request may wait in the picker: flow control's TTLs, when it is on."""
    return 0.0 if flow is None else max(flow.default_ttl, flow.no_endpoint_ttl)


def serve_options(cfg: GatewayConfig) -> ServeOptions:
    picker = load_config(cfg.picker_config) if cfg.picker_config else default_picker_config(cfg.retries.attempts)
    kube = None
    if cfg.servers.pool_name:
        from epp.datastore.kubernetes import KubernetesOptions

        kube = KubernetesOptions(namespace=cfg.servers.pool_namespace, pool_name=cfg.servers.pool_name,
                                 kubeconfig=cfg.servers.kubeconfig)
    return ServeOptions(config=picker, config_file=cfg.picker_config, endpoints=cfg.servers.static,
                        endpoints_file=cfg.servers.endpoints_file, kubernetes=kube, host="127.0.0.1",
                        metrics_host="0.0.0.0", grpc_port=cfg.picker_port, grpc_health_port=cfg.picker_health_port,
                        metrics_port=cfg.metrics_port, secure_serving=False, objectives_file=cfg.objectives,
                        api_keys_file=cfg.api_keys, metering_log=cfg.metering.log, strip_api_keys=True,
                        upstream_api_key_file=cfg.servers.api_key_file,
                        ejections=(cfg.circuit_breaker.consecutive_failures, cfg.circuit_breaker.ejection_time),
                        answer_models=True)


class EdsWriter:
    """Writes the datastore's endpoints to Envoy's EDS file, atomically, whenever they change."""

    def __init__(self, store: Datastore, path: Path) -> None:
        self.store, self.path = store, path
        self.version = 0
        store.on_change(lambda _added, _removed: self.write())

    def write(self) -> None:
        self.version += 1
        tmp = self.path.with_name(f".{self.path.name}.{self.version}")
        tmp.write_text(eds_document(sorted(self.store.addresses()), self.version))
        os.replace(tmp, self.path)  # Envoy watches the directory for files moved into it


@dataclass
class Gateway:
    """A running gateway: the picker and the Envoy in front of it."""

    cfg: GatewayConfig
    workdir: Path
    picker: PickerServer
    bootstrap_path: Path
    envoy: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.admin_port}"


def bootstrap_for(cfg: GatewayConfig, workdir: Path, flow: FlowSettings | None) -> dict[str, Any]:
    """The bootstrap ``epp gateway`` runs (``--print-config`` prints it); the TLS listeners' SDS
    files it points at are written into ``workdir``."""
    eds = None if cfg.servers.static else workdir / EDS_FILE
    write_sds(cfg, workdir)
    return render(cfg, eds_path=eds, longest_wait=longest_wait(flow), sds_dir=workdir)


def print_config(cfg: GatewayConfig, workdir: Path) -> str:
    opts = serve_options(cfg)
    return dump(bootstrap_for(cfg, workdir, build(opts.config).runtime().flow))


async def start(cfg: GatewayConfig, workdir: Path, opts: ServeOptions | None = None) -> Gateway:
    """Start the picker, then Envoy; returns once Envoy is live."""
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start
    opts = opts or serve_options(cfg)
    picker = PickerServer(opts)
    if not cfg.servers.static:
        EdsWriter(picker.store, workdir / EDS_FILE).write()  # before Envoy reads it
    await picker.start()
    path = workdir / "envoy-gateway.yaml"
    room = picker.director.waiting
    path.write_text(dump(bootstrap_for(cfg, workdir, room.controller.settings if room is not None else None)))
    gw = Gateway(cfg, workdir, picker, path)
    try:
        await _start_envoy(gw)
    except BaseException:
        await picker.stop(grace=0.2)
        raise
    return gw


async def _start_envoy(gw: Gateway) -> None:
    gw.envoy = envoy_mod.start(gw.bootstrap_path, gw.workdir / "envoy.log", concurrency=gw.cfg.envoy_concurrency)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if gw.envoy.poll() is not None:
            raise RuntimeError(f"Envoy exited with {gw.envoy.returncode}; its log: {gw.workdir / 'envoy.log'}")
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as s, \
                    s.get(f"{gw.admin_url}/ready") as r:
                if r.status == 200:
                    return
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("Envoy did not become ready within 30 s")


async def stop(gw: Gateway) -> None:
    if gw.envoy is not None and gw.envoy.poll() is None:
        gw.envoy.terminate()
        try:
            await asyncio.to_thread(gw.envoy.wait, 5)
        except subprocess.TimeoutExpired:
            gw.envoy.kill()
    await gw.picker.stop(grace=0.5)


async def run_forever(cfg: GatewayConfig, workdir: Path, opts: ServeOptions | None = None) -> None:
    """Serve until cancelled (SIGTERM); restart Envoy when it exits, at most five times a minute."""
    gw = await start(cfg, workdir, opts)
    settle()
    ports = ", ".join(f"{'https' if x.tls else 'http'}://{x.address}:{x.port}" for x in cfg.listeners)
    log.info("epp gateway serving on %s (Envoy admin 127.0.0.1:%d, picker metrics :%d)", ports, cfg.admin_port,
             gw.picker.bound_ports.get("metrics", 0))
    restarts: list[float] = []
    try:
        while True:
            await asyncio.sleep(0.5)
            assert gw.envoy is not None
            if gw.envoy.poll() is None:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > 5:
                raise RuntimeError("Envoy keeps exiting (5 restarts in a minute); see " + str(workdir / "envoy.log"))
            log.error("Envoy exited with %s; restarting it", gw.envoy.returncode)
            await _start_envoy(gw)
    finally:
        await gw.picker.drain(min(gw.picker.opts.drain_timeout, 5.0))
        await stop(gw)
