"""``GET /record`` on the metrics port: the request recorder's records as server-sent events, for
``epp record``. Authorized as /metrics is; ``?prompts=1`` only where epp runs with
--record-prompts (403 otherwise)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from epp.requestcontrol.recorder import Recorder


class RecordEndpoint:
    def __init__(self, recorder: Recorder, refusal: Callable[[web.Request], Awaitable[web.Response | None]]) -> None:
        self.recorder = recorder
        self.refusal = refusal

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/record", self._stream)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        refused = await self.refusal(request)
        if refused is not None:
            return refused
        try:
            recording = self.recorder.open(request.query.get("prompts") in ("1", "true"))
        except PermissionError as e:
            return web.json_response({"error": {"message": str(e), "type": "PermissionDeniedError", "param": "prompts",
                                                "code": 403}}, status=403)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        try:
            await resp.prepare(request)
            await resp.write(b": recording\n\n")  # the client knows it is on before the first request ends
            while chunk := await recording.queue.get():  # (b"": epp is stopping)
                await resp.write(chunk)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.recorder.close(recording)
        return resp
