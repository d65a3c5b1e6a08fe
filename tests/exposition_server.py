"""A server that answers GET /metrics with a Prometheus text exposition the test chooses (what a
DCGM exporter serves), on 127.0.0.1."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from epp.stack.local import free_port


@contextlib.asynccontextmanager
async def exposition_server(answer: Callable[[], tuple[int, str]]) -> AsyncIterator[int]:
    """Serve ``answer()`` (status, text) on /metrics; yields the port."""

    async def metrics(_: web.Request) -> web.Response:
        status, text = answer()
        return web.Response(status=status, text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()
