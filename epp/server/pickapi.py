"""epp.v1.EndpointPicker: the scheduler for gateways that are not Envoy."""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc

from epp.request import InferenceRequest, RequestError, parse_body, prompt_of_messages
from epp.scheduling.types import SchedulingError
from epp.server.picking import Pick, PickService
from epp.v1 import picker_pb2, picker_pb2_grpc


class PickAPI(picker_pb2_grpc.EndpointPickerServicer):  # type: ignore[misc]
    """Pick / Release; picks not released within ``ttl`` seconds are released automatically."""

    def __init__(self, picks: PickService, ttl: float = 600.0) -> None:
        self.picks = picks
        self.ttl = ttl
        self._open: dict[str, tuple[Pick, float]] = {}

    def _expire(self, now: float) -> None:
        if len(self._open) < 64:
            return
        for pid, (p, t) in list(self._open.items()):
            if now - t > self.ttl:
                p.finish()
                del self._open[pid]

    def _request(self, r: Any) -> InferenceRequest:
        headers = dict(r.headers)
        path = r.path or "/v1/chat/completions"
        rid = headers.get("x-request-id", "")
        which = r.WhichOneof("input")
        if which == "body":
            return parse_body(rid, path, headers, r.body)
        if not r.model:
            raise RequestError(400, "missing 'model'", param="model")
        if which == "messages":
            prompt = prompt_of_messages([{"role": m.role, "content": m.content} for m in r.messages.messages])
        else:
            prompt = r.prompt
        return InferenceRequest(rid, path, model=r.model, prompt=prompt, headers=headers, has_body=True,
                                target_model=r.model)

    async def Pick(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            req = self._request(request)
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
            raise
        try:
            pick = self.picks.pick(req)
        except SchedulingError as e:
            self.picks.refused(req, e.status)
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.status == 429 else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, e.message)
            raise
        now = time.monotonic()
        self._expire(now)
        pid = uuid.uuid4().hex
        self._open[pid] = (pick, now)
        d = pick.decision
        resp = picker_pb2.PickResponse(endpoint=d.primary, fallback_endpoints=list(d.endpoints[1:]),
                                       reason=d.reason(), pick_id=pid)
        for address, (total, parts) in d.scores().items():
            s = resp.scores.add(endpoint=address, total=total)
            for name, v in parts.items():
                s.scores[name] = v
        return resp

    async def Release(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        entry = self._open.pop(request.pick_id, None)
        if entry is not None:
            entry[0].finish()
        return picker_pb2.ReleaseResponse(released=entry is not None)
