"""Serving: the gRPC port (ext_proc and the epp.v1 Pick API on epp's HTTP/2 server, TLS by
default) and the HTTP port of /metrics (optionally behind a bearer token)."""

from __future__ import annotations

import asyncio
import logging
import tempfile

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epp.observability.metrics import PickerMetrics
from epp.server import h2grpc
from epp.server.auth import TokenFile
from epp.server.extproc import StreamFactory
from epp.server.extproc import h2_services as extproc_services
from epp.server.pickapi import PickAPI
from epp.server.tls import load_cert_dir, self_signed

log = logging.getLogger("epp")


class GrpcServing:
    """ext_proc + Pick API on one port; ``drain`` keeps serving until the gateway goes quiet."""

    def __init__(self, new_stream: StreamFactory, pick_api: PickAPI, limits: h2grpc.Limits) -> None:
        self.server = h2grpc.H2GrpcServer({**extproc_services(new_stream), **pick_api.h2_services()}, limits)

    async def start(self, host: str, port: int, secure: bool, cert_path: str | None) -> int:
        tls = None
        if secure:
            key, crt = load_cert_dir(cert_path) if cert_path else self_signed()
            tls = h2grpc.server_tls(key, crt, tempfile.gettempdir())
        return await self.server.start(host, port, tls)

    def open_streams(self) -> int:
        return self.server.open_streams()

    async def drain(self, timeout: float) -> None:
        log.info("draining: readiness NOT_SERVING, %d streams open, up to %gs", self.open_streams(), timeout)
        if await self.server.drain(timeout):
            log.info("drained")
        else:
            log.warning("drain timeout: %d streams still open", self.open_streams())

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)


class MetricsEndpoint:
    """GET /metrics. The loop-owned gauges are read on the loop; the rendering runs in a thread,
    so even a large exposition costs routing a GIL switch interval at a time, not the whole render."""

    def __init__(self, metrics: PickerMetrics, token: TokenFile | None) -> None:
        self.metrics = metrics
        self.token = token
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = getattr(site, "_server", None)  # aiohttp keeps the asyncio server private
        sockets = getattr(server, "sockets", None) or []
        bound: int = sockets[0].getsockname()[1] if sockets else port
        return bound

    async def _handle(self, request: web.Request) -> web.Response:
        if self.token is not None and not self.token.allows(request.headers.get("Authorization")):
            error = {"message": "missing or wrong bearer token", "type": "AuthenticationError", "param": None,
                     "code": 401}
            return web.json_response({"error": error}, status=401, headers={"WWW-Authenticate": "Bearer"})
        everything = self.metrics.prepare()
        body = await asyncio.to_thread(generate_latest, everything)  # type: ignore[arg-type,unused-ignore]
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

