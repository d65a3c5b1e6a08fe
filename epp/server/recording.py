"""``GET /record`` on the metrics port: the request recorder's records as server-sent events, for
``epp record``. Authorized as /metrics is; ``?prompts=1`` only where epp runs with
--record-prompts (403 otherwise)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from epp.observability.events import stream_events
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
        try:  # (the comment line tells the client it is on before the first request ends)
            return await stream_events(request, recording.queue, b": recording\n\n")
        finally:
            self.recorder.close(recording)
