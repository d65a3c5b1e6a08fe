"""Serving: the gRPC port (ext_proc and the epp.v1 Pick API on epp's HTTP/2 server, TLS by
default) and the HTTP port of /metrics (optionally behind a bearer token)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epp.observability.metrics import PickerMetrics
from epp.server import h2grpc
from epp.server.auth import ALLOWED, FORBIDDEN, UNAUTHENTICATED, UNAVAILABLE, Authorizer
from epp.server.extproc import StreamFactory
from epp.server.extproc import h2_services as extproc_services
from epp.server.observed import ObserverRegistry
from epp.server.tls import TLSPolicy, load_cert_dir, self_signed
from epp.tasks import cancel_and_wait

log = logging.getLogger("epp")


class GrpcServing:
    """ext_proc + Pick API on one port; ``drain`` keeps serving until the gateway goes quiet.

    With TLS, ``tls`` sets the minimum version and cipher suites; with ``cert_reload`` the
    certificate in ``cert_path`` is re-read when its files change (new handshakes use it; a bad
    pair is logged and the old one kept)."""

    def __init__(self, new_stream: StreamFactory, unary: dict[str, h2grpc.HandlerFactory],
                 limits: h2grpc.Limits, observed: ObserverRegistry | None = None) -> None:
        """``unary``: the epp.v1 Pick API's methods (the API itself, or a worker's relay of it);
        ``observed``: the picks observer streams read (--observed-responses)."""
        self.server = h2grpc.H2GrpcServer({**extproc_services(new_stream, observed), **unary}, limits)
        self._reload: asyncio.Task[None] | None = None
        self.cert_reloads = 0

    async def start(self, host: str, port: int, secure: bool, cert_path: str | None, tls: TLSPolicy | None = None,
                    cert_reload: bool = False, reload_interval: float = 1.0, reuse_port: bool = False) -> int:
        ctx = None
        if secure:
            key, crt = load_cert_dir(cert_path) if cert_path else self_signed()
            ctx = h2grpc.server_tls(key, crt, tempfile.gettempdir())
            (tls or TLSPolicy()).apply(ctx)
            if cert_reload and cert_path:
                self._reload = asyncio.create_task(self._watch_cert(ctx, cert_path, reload_interval))
        return await self.server.start(host, port, ctx, reuse_port)

    async def _watch_cert(self, ctx: ssl.SSLContext, cert_path: str, interval: float) -> None:
        last = _digest(cert_path)
        while True:
            await asyncio.sleep(interval)
            now = _digest(cert_path)
            if now == last:
                continue
            last = now
            try:
                key, crt = load_cert_dir(cert_path)
                h2grpc.load_certificate(ctx, key, crt, tempfile.gettempdir())
            except (OSError, ValueError, ssl.SSLError) as e:
                log.error("certificate in %s not reloaded, keeping the previous one: %s", cert_path, e)
                continue
            self.cert_reloads += 1
            log.info("certificate reloaded from %s", cert_path)

    def open_streams(self) -> int:
        return self.server.open_streams()

    async def drain(self, timeout: float) -> None:
        log.info("draining: readiness NOT_SERVING, %d streams open, up to %gs", self.open_streams(), timeout)
        if await self.server.drain(timeout):
            log.info("drained")
        else:
            log.warning("drain timeout: %d streams still open", self.open_streams())

    async def stop(self, grace: float) -> None:
        await cancel_and_wait([self._reload])
        await self.server.stop(grace)


def _digest(cert_path: str) -> bytes:
    h = hashlib.sha256()
    for name in ("tls.crt", "tls.key"):
        with contextlib.suppress(OSError):
            h.update((Path(cert_path) / name).read_bytes())
    return h.digest()


_REFUSALS = {UNAUTHENTICATED: ("missing or wrong bearer token", "AuthenticationError"),
             FORBIDDEN: ("this identity may not read /metrics", "PermissionDeniedError"),
             UNAVAILABLE: ("cannot check the bearer token now", "ServiceUnavailableError")}


class MetricsEndpoint:
    """GET /metrics. The loop-owned gauges are read on the loop; the rendering runs in a thread,
    so even a large exposition costs routing a GIL switch interval at a time, not the whole render."""

    def __init__(self, metrics: PickerMetrics, auth: Authorizer | None) -> None:
        self.metrics = metrics
        self.auth = auth
        self._runner: web.AppRunner | None = None
        self.pages: list[Callable[[web.Application], None]] = []  # more routes on this port (the dashboard)

    async def start(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        for add in self.pages:
            add(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = getattr(site, "_server", None)  # aiohttp keeps the asyncio server private
        sockets = getattr(server, "sockets", None) or []
        bound: int = sockets[0].getsockname()[1] if sockets else port
        return bound

    async def refusal(self, request: web.Request) -> web.Response | None:
        """The answer to a request /metrics' authorization refuses (None: allowed)."""
        if self.auth is not None:
            status = await self.auth.authorize(request.headers.get("Authorization"))
            if status != ALLOWED:
                message, kind = _REFUSALS[status]
                error = {"message": message, "type": kind, "param": None, "code": status}
                headers = {"WWW-Authenticate": "Bearer"} if status == UNAUTHENTICATED else {}
                return web.json_response({"error": error}, status=status, headers=headers)
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        refused = await self.refusal(request)
        if refused is not None:
            return refused
        everything = self.metrics.prepare()
        body = await asyncio.to_thread(generate_latest, everything)  # type: ignore[arg-type,unused-ignore]
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

