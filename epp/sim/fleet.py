"""Run N simulated servers in one process (``epp sim``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import Sequence

import zmq.asyncio

from epp.sim.kvevents import KVEventsConfig
from epp.sim.profiles import EngineParams
from epp.sim.server import SimServer

log = logging.getLogger("epp.sim")


def parse_ports(spec: str) -> list[int]:
    """``8001-8004`` or ``8001,8003`` (or a mix) -> ports."""
    ports: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            a, b = int(lo), int(hi)
            if b < a:
                raise ValueError(f"bad port range {part!r}")
            ports.extend(range(a, b + 1))
        else:
            ports.append(int(part))
    if not ports:
        raise ValueError("no ports given")
    bad = [p for p in ports if not 0 < p < 65536]
    if bad:
        raise ValueError(f"invalid port(s): {bad}")
    if len(set(ports)) != len(ports):
        raise ValueError("duplicate ports")
    return ports


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, needed))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Fleet:
    """N independent simulated servers sharing one event loop (and one ZMQ context)."""

    def __init__(self, ports: Sequence[int], params: EngineParams | Sequence[EngineParams], *, host: str = "127.0.0.1",
                 seed: int = 0, kv_events: KVEventsConfig | None = None, data_parallel: int = 1) -> None:
        """``params``: one preset for every server, or one per server (a mixed fleet).
        ``data_parallel`` > 1: each run of that many consecutive ports is one pod's vLLM
        data-parallel ranks (rank i on the i-th port); any of them takes a request for a sibling
        rank named in ``x-data-parallel-host-port`` and hands it to that rank's engine."""
        per_server = [params] * len(ports) if isinstance(params, EngineParams) else list(params)
        if len(per_server) != len(ports):
            raise ValueError(f"{len(ports)} ports for {len(per_server)} servers' parameters")
        if data_parallel < 1 or len(ports) % data_parallel:
            raise ValueError(f"{len(ports)} ports do not split into pods of {data_parallel} data-parallel ranks")
        self.zmq_ctx = zmq.asyncio.Context() if kv_events and kv_events.enable_kv_cache_events else None
        self.servers = [
            SimServer(port, p.with_overrides(data_parallel_rank=i % data_parallel) if data_parallel > 1 else p,
                      host=host, seed=seed + i, index=i, kv_events=kv_events, zmq_ctx=self.zmq_ctx)
            for i, (port, p) in enumerate(zip(ports, per_server, strict=True))
        ]
        for start in range(0, len(self.servers), data_parallel) if data_parallel > 1 else ():
            pod = self.servers[start : start + data_parallel]
            ranks = {s.address: s for s in pod}
            for s in pod:
                s.ranks = ranks

    async def start(self) -> None:
        raise_fd_limit(64 + 8 * len(self.servers))
        for s in self.servers:
            await s.start()

    async def stop(self) -> None:
        for s in self.servers:
            with contextlib.suppress(Exception):
                await s.stop()
        if self.zmq_ctx is not None:
            self.zmq_ctx.term()


async def serve_forever(fleet: Fleet) -> None:
    await fleet.start()
    addrs = ", ".join(s.address for s in fleet.servers[:8]) + (" ..." if len(fleet.servers) > 8 else "")
    log.info("simulated vLLM fleet: %d servers (%s)", len(fleet.servers), addrs)
    try:
        await asyncio.Event().wait()
    finally:
        await fleet.stop()
