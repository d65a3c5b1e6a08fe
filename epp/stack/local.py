"""A local stack on 127.0.0.1: simulated fleet + epp + real Envoy.

In-process mode (tests): the fleet and epp run in the caller's event loop, Envoy as a child
process. Process mode (demo, bench): every part is its own process, so CPU can be measured per
component.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from epp.config import PickerConfig, load_config, parse_config
from epp.server.app import PickerServer, ServeOptions
from epp.sim.fleet import Fleet
from epp.sim.kvevents import KVEventsConfig
from epp.sim.profiles import EngineParams, profile
from epp.stack import envoy as envoy_mod
from epp.stack.ports import PortAllocator


def endpoints_yaml(addresses: Sequence[str], labels: Sequence[dict[str, str]] | None = None) -> str:
    """An endpoints file for ``addresses``, with each one's labels when given."""
    if not labels:
        return "".join(f"- {a}\n" for a in addresses)
    return yaml.safe_dump([{"address": a, "labels": dict(ls)} if ls else a
                           for a, ls in zip(addresses, labels, strict=True)], sort_keys=False)


PORTS = PortAllocator()  # one per process: ports are a process-wide resource


def free_port() -> int:
    """A free port no other caller in this process has been given."""
    return PORTS.take(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports no other caller in this process has been given."""
    return PORTS.take(n)


async def wait_until(check: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``await check()`` until truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            if await check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def http_ok(url: str, expect: str | None = None) -> bool:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as s, s.get(url) as r:
        if r.status != 200:
            return False
        return expect is None or expect in await r.text()


@dataclass
class EnvoyProc:
    """A running Envoy child process."""

    proc: subprocess.Popen[bytes]
    listen_port: int
    admin_port: int
    config_path: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def start_envoy(template: str, workdir: Path, *, epp_port: int = 0, endpoints: Sequence[str] = (),
                      lb_policy: str = "ROUND_ROBIN", epp_tls: bool = False, concurrency: int = 1,
                      timeout: float = 20.0, ext_proc: dict[str, Any] | None = None,
                      epp_cluster: dict[str, Any] | None = None) -> EnvoyProc:
    listen, admin = free_ports(2)
    cfg = envoy_mod.render(template, listen_port=listen, admin_port=admin, epp_port=epp_port,
                           endpoints=endpoints, lb_policy=lb_policy, epp_tls=epp_tls, ext_proc=ext_proc,
                           epp_cluster=epp_cluster)
    path = envoy_mod.write(cfg, workdir / f"envoy-{template}-{listen}.yaml")
    log = workdir / f"envoy-{listen}.log"
    proc = envoy_mod.start(path, log, concurrency=concurrency)
    ep = EnvoyProc(proc, listen, admin, path, log)
    try:
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready", "LIVE"), timeout, "Envoy ready")
    except TimeoutError:
        ep.stop()
        raise
    return ep


@dataclass
class Stack:
    fleet: Fleet
    picker: PickerServer | None
    envoy: EnvoyProc
    workdir: Path
    config_path: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.fleet.servers]

    def server(self, address: str) -> Any:
        for s in self.fleet.servers:
            if s.address == address:
                return s
        raise KeyError(address)


@contextlib.asynccontextmanager
async def in_process_stack(*, servers: int = 4, params: EngineParams | Sequence[EngineParams] | None = None,
                           template: str = "epp-full-duplex",
                           config_text: str | None = None, secure: bool = False, staleness: float = 2.0,
                           refresh: float = 0.05, endpoints_file: bool = False,
                           kv_events: KVEventsConfig | None = None, wait_ready: bool = True,
                           workdir: Path | None = None, decision_headers: bool = False,
                           kubernetes: Any = None,
                           ports: Sequence[int] | None = None,
                           objectives_text: str | None = None,
                           serve: dict[str, Any] | None = None, data_parallel: int = 1,
                           labels: Sequence[dict[str, str]] | None = None,
                           ext_proc: dict[str, Any] | None = None,
                           epp_cluster: dict[str, Any] | None = None) -> AsyncIterator[Stack]:
    """Fleet + epp in this event loop, a real Envoy child process in front. With ``kubernetes``
    (KubernetesOptions), epp discovers the endpoints instead of being given the fleet's."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="epp-stack-")
        workdir = Path(tmp.name)
    fleet_ports = list(ports) if ports is not None else free_ports(servers)
    own = free_ports(3)
    fleet = Fleet(fleet_ports, params or profile("fast"), kv_events=kv_events, data_parallel=data_parallel)
    await fleet.start()
    config_path: Path | None = None
    cfg: PickerConfig
    if config_text is not None:
        config_path = workdir / "epp-config.yaml"
        config_path.write_text(config_text)
        cfg = parse_config(config_text, str(config_path))
    else:
        cfg = load_config(None)
    addrs = tuple(s.address for s in fleet.servers)
    ep_file = None
    if endpoints_file or labels:  # labels (per server, in order) go in the endpoints file, as a pod's would
        ep_file = workdir / "endpoints.yaml"
        ep_file.write_text(endpoints_yaml(addrs, labels))
    objectives = None
    if objectives_text is not None:
        objectives = workdir / "objectives.yaml"
        objectives.write_text(objectives_text)
    opts = ServeOptions(config=cfg, objectives_file=str(objectives) if objectives else None,
                        config_file=str(config_path) if config_path else None,
                        endpoints=() if ep_file or kubernetes else addrs,
                        endpoints_file=str(ep_file) if ep_file else None, kubernetes=kubernetes,
                        host="127.0.0.1", grpc_port=own[0], grpc_health_port=own[1], metrics_port=own[2],
                        secure_serving=secure,
                        refresh_metrics_interval=refresh, metrics_staleness_threshold=staleness,
                        config_poll_interval=0.2, decision_headers=decision_headers)
    if serve:  # any other ServeOptions field (limits, tokens...)
        opts = dataclasses.replace(opts, **serve)
    picker = PickerServer(opts)
    await picker.start()
    envoy = None
    try:
        if wait_ready:
            await wait_until(lambda: _ready(picker), 10, "fresh metrics in epp")
        envoy = await start_envoy(template, workdir, epp_port=picker.bound_ports["grpc"], epp_tls=secure,
                                  ext_proc=ext_proc, epp_cluster=epp_cluster)
        stack = Stack(fleet, picker, envoy, workdir, config_path)
        if objectives is not None:
            stack.extras["objectives_file"] = objectives
        if ep_file:
            stack.extras["endpoints_file"] = ep_file
        yield stack
    finally:
        if envoy is not None:
            envoy.stop()
        await picker.stop(grace=0.2)
        await fleet.stop()
        if tmp is not None:
            tmp.cleanup()


async def _ready(picker: PickerServer) -> bool:
    return picker.store.fresh_count() == len(picker.store.addresses()) > 0


def spawn(args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m epp.cli ...`` (or another command) with its output in ``log_path``."""
    out = open(log_path, "wb")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, env=env or dict(os.environ))


def epp_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "epp.cli", *args]


@dataclass
class GatewayStack:
    """A simulated fleet behind ``epp gateway`` (the picker in this loop, Envoy a child process)."""

    fleet: Fleet
    gateway: Any  # epp.gateway.run.Gateway
    cfg: Any  # epp.gateway.config.GatewayConfig
    workdir: Path

    @property
    def url(self) -> str:
        x = self.cfg.listeners[0]
        return f"{'https' if x.tls else 'http'}://127.0.0.1:{x.port}"

    @property
    def picker(self) -> PickerServer:
        p: PickerServer = self.gateway.picker
        return p

    def server(self, address: str) -> Any:
        return next(s for s in self.fleet.servers if s.address == address)


@contextlib.asynccontextmanager
async def gateway_stack(config_text: str = "", *, servers: int = 3, params: EngineParams | None = None,
                        scale: float = 1.0, workdir: Path | None = None,
                        serve: dict[str, Any] | None = None,
                        before: Any = None) -> AsyncIterator[GatewayStack]:
    """``epp gateway`` in front of a simulated fleet. ``config_text``: the gateway config without
    the servers (the fleet's static list is added to ``servers``), listener and ports (free ones are chosen);
    ``{workdir}`` in it is replaced. ``scale`` shortens every timeout (--timeout-scale);
    ``before(fleet)`` runs once the fleet is up, before the gateway starts (write its files)."""
    from epp.gateway import run
    from epp.gateway.config import parse_gateway_config

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="epp-gateway-")
        workdir = Path(tmp.name)
    fleet = Fleet(free_ports(servers), params or profile("fast"))
    await fleet.start()
    if before is not None:
        prepared = before(fleet)
        if asyncio.iscoroutine(prepared):
            await prepared
    listen, admin, grpc, health, metrics = free_ports(5)
    doc = yaml.safe_load(config_text.replace("{workdir}", str(workdir))) if config_text.strip() else {}
    servers_doc = doc.setdefault("servers", {})
    if not {"static", "endpointsFile", "pool"} & set(servers_doc):  # the fleet, as a static list
        servers_doc["static"] = [s.address for s in fleet.servers]
    doc.setdefault("metering", {"log": False})  # (the CLI's default is stdout)
    listeners = doc.setdefault("listeners", [{}])
    listeners[0].setdefault("port", listen)
    listeners[0].setdefault("address", "127.0.0.1")
    doc["envoy"] = {"adminPort": admin}
    doc.setdefault("picker", {}).update({"grpcPort": grpc, "healthPort": health, "metricsPort": metrics})
    cfg = parse_gateway_config(yaml.safe_dump(doc), str(workdir / "gateway.yaml"))
    if scale != 1.0:
        cfg = cfg.scaled(scale)
    opts = dataclasses.replace(run.serve_options(cfg), metrics_host="127.0.0.1", refresh_metrics_interval=0.05,
                               config_poll_interval=0.1, **(serve or {}))
    gw = None
    try:
        gw = await run.start(cfg, workdir, opts)
        await wait_until(lambda: _ready(gw.picker), 10, "fresh metrics in epp")
        yield GatewayStack(fleet, gw, cfg, workdir)
    finally:
        if gw is not None:
            await run.stop(gw)
        await fleet.stop()
        if tmp is not None:
            tmp.cleanup()
