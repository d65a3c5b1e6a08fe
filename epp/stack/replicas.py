"""Active-active pickers on 127.0.0.1 for tests and benchmarks: a real Valkey/Redis server (the
distribution's package; `make redis` installs it), several epp replicas sharing state through it,
and one real Envoy in front of them all."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from epp.config import load_config, parse_config
from epp.server.app import PickerServer, ServeOptions
from epp.server.sharedstate import SharedStateOptions
from epp.sim.fleet import Fleet
from epp.sim.profiles import EngineParams, profile
from epp.stack import envoy as envoy_mod
from epp.stack.local import EnvoyProc, free_ports, http_ok, wait_until

T = TypeVar("T")


def redis_binary() -> str | None:
    """valkey-server or redis-server, from PATH or the distribution's place."""
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if found:
            return found
    return None


@dataclass
class RedisProc:
    proc: subprocess.Popen[bytes] | None
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    async def start(self, timeout: float = 10.0) -> None:
        """Start (or start again, on the same port) an empty, unpersisted server."""
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("no valkey-server or redis-server (make redis installs Debian's redis-server)")
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=log, stderr=subprocess.STDOUT)
        await wait_until(self.ping, timeout, "redis-server answering")

    async def used_memory(self) -> int | None:
        """The server's used_memory in bytes (INFO memory); None when it does not answer."""
        async def read(reader: asyncio.StreamReader) -> int | None:
            size = int((await asyncio.wait_for(reader.readline(), 1.0))[1:])
            text = (await asyncio.wait_for(reader.readexactly(size + 2), 1.0)).decode()
            found = [line for line in text.splitlines() if line.startswith("used_memory:")]
            return int(found[0].split(":")[1]) if found else None

        return await self._ask(b"INFO memory", read)

    async def ping(self) -> bool:
        async def read(reader: asyncio.StreamReader) -> bool:
            return (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG")

        return await self._ask(b"PING", read) or False

    async def _ask(self, command: bytes, read: Callable[[asyncio.StreamReader], Awaitable[T]]) -> T | None:
        """One inline command on a new connection and ``read``'s answer; None when the server does not answer."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return None
        try:
            writer.write(command + b"\r\n")
            return await read(reader)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            return None
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def redis_server(workdir: Path) -> AsyncIterator[RedisProc]:
    r = RedisProc(None, free_ports(1)[0], workdir)
    await r.start()
    try:
        yield r
    finally:
        r.stop()


@dataclass
class ReplicaStack:
    fleet: Fleet
    pickers: list[PickerServer]
    envoy: EnvoyProc
    redis: RedisProc | None
    workdir: Path

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.fleet.servers]


@contextlib.asynccontextmanager
async def replica_stack(*, replicas: int = 2, servers: int = 4, params: EngineParams | Sequence[EngineParams] | None
                        = None, config_text: str | None = None, shared: bool = True, interval: float = 0.05,
                        staleness: float = 1.0, template: str = "epp-full-duplex",
                        serve: dict[str, Any] | None = None) -> AsyncIterator[ReplicaStack]:
    """A simulated fleet, ``replicas`` pickers in this loop (sharing state through a real Redis
    when ``shared``) and one Envoy sending each ext_proc stream to one of them."""
    with tempfile.TemporaryDirectory(prefix="epp-replicas-") as tmp:
        workdir = Path(tmp)
        fleet = Fleet(free_ports(servers), params or profile("fast"))
        await fleet.start()
        cfg = parse_config(config_text, "config") if config_text is not None else load_config(None)
        redis = RedisProc(None, free_ports(1)[0], workdir) if shared else None
        pickers: list[PickerServer] = []
        envoy: EnvoyProc | None = None
        try:
            if redis is not None:
                await redis.start()
            for i in range(replicas):
                grpc, health, metrics = free_ports(3)
                opts = ServeOptions(config=cfg, endpoints=tuple(s.address for s in fleet.servers), host="127.0.0.1",
                                    grpc_port=grpc, grpc_health_port=health, metrics_port=metrics,
                                    secure_serving=False, refresh_metrics_interval=0.05, config_poll_interval=0.2,
                                    pool_name="replicas", shared_state=SharedStateOptions(
                                        redis.url, "epp:test/replicas", interval, staleness, replica=f"replica-{i}")
                                    if redis is not None else None)
                if serve:
                    opts = dataclasses.replace(opts, **serve)
                picker = PickerServer(opts)
                await picker.start()
                pickers.append(picker)
            await wait_until(lambda: _all_fresh(pickers), 10, "fresh metrics in every replica")
            envoy = await start_envoy_for(template, workdir,
                                          [(p.bound_ports["grpc"], p.bound_ports["health"]) for p in pickers])
            yield ReplicaStack(fleet, pickers, envoy, redis, workdir)
        finally:
            if envoy is not None:
                envoy.stop()
            for p in pickers:
                with contextlib.suppress(Exception):
                    await p.stop(grace=0.2)
            if redis is not None:
                redis.stop()
            await fleet.stop()


async def _all_fresh(pickers: Sequence[PickerServer]) -> bool:
    return all(p.store.fresh_count() == len(p.store.addresses()) > 0 for p in pickers)


async def start_envoy_for(template: str, workdir: Path, replicas: Sequence[tuple[int, int]],
                          timeout: float = 20.0) -> EnvoyProc:
    """Envoy (``template``) with every replica, (gRPC port, health port), in its ext_proc cluster;
    returned once it has sent a stream to each."""
    listen, admin = free_ports(2)
    cfg = envoy_mod.render(template, listen_port=listen, admin_port=admin, replicas=replicas)
    path = envoy_mod.write(cfg, workdir / f"envoy-replicas-{listen}.yaml")
    log = workdir / f"envoy-{listen}.log"
    ep = EnvoyProc(envoy_mod.start(path, log), listen, admin, path, log)
    try:
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready", "LIVE"), timeout, "Envoy ready")
        await wait_until(lambda: healthy_replicas(ep, len(replicas)), timeout, "Envoy sending to every replica")
    except TimeoutError:
        ep.stop()
        raise
    return ep


async def healthy_replicas(envoy: EnvoyProc, n: int) -> bool:
    """True once Envoy has sent a stream to each of the ``n`` replicas. Envoy's workers balance
    over a host only a moment after its passed health check, so each check sends a probe (a path
    no parser claims: the picker answers 400 without a pick) and reads every host's stream count."""
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{envoy.url}/epp-stack-probe") as r:
                await r.read()
            async with s.get(f"http://127.0.0.1:{envoy.admin_port}/clusters") as r:
                hosts = await r.text()
    except aiohttp.ClientError:
        return False
    used = [line for line in hosts.splitlines()
            if line.startswith("epp::") and "::rq_total::" in line and not line.endswith("::0")]
    return len(used) == n
