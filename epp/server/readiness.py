"""Health and readiness: liveness is SERVING while the process runs; readiness (the services
gateways and probes ask) is SERVING once some endpoint has fresh metrics, this replica leads
(with leader election), and it is not draining. ``inference-extension``, which the reference's
chart probes for liveness and readiness of a single replica, is SERVING as the reference's
is: once the pool is known (listed), while not draining and (with leader election) leading;
so a pool without pods is not restarted in a loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from epp.server import h2grpc
from epp.server.extproc import SERVICE as EXTPROC_SERVICE
from epp.server.health import NOT_SERVING, SERVING, HealthState
from epp.tasks import cancel_and_wait

# The health services that say whether to send epp traffic (liveness stays SERVING).
READINESS_SERVICES = ("", "readiness", EXTPROC_SERVICE)
POOL_SERVICE = "inference-extension"


class Readiness:
    def __init__(self, has_fresh_endpoint: Callable[[], bool], serves_picks: Callable[[], bool],
                 pool_synced: Callable[[], bool] = lambda: True, interval: float = 0.25) -> None:
        self.has_fresh_endpoint = has_fresh_endpoint
        self.serves_picks = serves_picks  # holds the Lease (when elected), has linked workers (--workers)
        self.pool_synced = pool_synced
        self.interval = interval
        self.health = HealthState()
        self.server: h2grpc.H2GrpcServer | None = None
        self.draining = False
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        """Serve grpc.health.v1 on ``host:port``; returns the bound port."""
        self.server = h2grpc.H2GrpcServer(self.health.h2_services())
        bound = await self.server.start(host, port)
        self.health.set("liveness", SERVING)
        self.update()
        self._task = asyncio.create_task(self._loop())
        return bound

    def update(self) -> None:
        serving = not self.draining and self.serves_picks()
        status = SERVING if serving and self.has_fresh_endpoint() else NOT_SERVING
        for svc in READINESS_SERVICES:
            self.health.set(svc, status)
        self.health.set(POOL_SERVICE, SERVING if serving and self.pool_synced() else NOT_SERVING)

    def drain(self) -> None:
        """From now on NOT_SERVING (the process is going away)."""
        self.draining = True
        self.update()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.update()

    async def stop(self, grace: float = 1.0) -> None:
        await cancel_and_wait([self._task])
        if self.server is not None:
            await self.server.stop(grace)
