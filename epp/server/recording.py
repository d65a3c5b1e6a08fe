"""``GET /record`` on the metrics port: the request recorder's records as server-sent events, for
``epp record``. Authorized as /metrics is; ``?prompts=1`` only where epp runs with
--record-prompts (403 otherwise). The first event describes the pool (each endpoint's cache
config, as its metrics report it): what a replay configures its engines from."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from epp.datastore.store import Datastore
from epp.observability.events import stream_events
from epp.requestcontrol.recorder import Recorder


class RecordEndpoint:
    def __init__(self, recorder: Recorder, refusal: Callable[[web.Request], Awaitable[web.Response | None]],
                 store: Datastore) -> None:
        self.recorder = recorder
        self.refusal = refusal
        self.store = store

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
            head = b": recording\n\ndata: " + orjson.dumps({"pool": pool(self.store)}) + b"\n\n"
            return await stream_events(request, recording.queue, head)
        finally:
            self.recorder.close(recording)


def pool(store: Datastore) -> list[dict[str, Any]]:
    """Each endpoint: its address, labels and, once scraped, its KV cache's block size and blocks."""
    out = []
    for e in store.snapshot().endpoints:
        sig = e.signals
        out.append({"address": e.address, "labels": dict(e.labels),
                    "block_size": sig.block_size if sig is not None else None,
                    "num_gpu_blocks": sig.num_gpu_blocks if sig is not None else None,
                    "models": list(sig.models) if sig is not None else []})
    return out
