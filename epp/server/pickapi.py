"""epp.v1.EndpointPicker: the scheduler for gateways that are not Envoy.

``PickAPI`` holds the logic (synchronous); the HTTP/2 server and grpcio adapt it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc

from epp.request import InferenceRequest, RequestError, parse_body, prompt_of_messages
from epp.scheduling.types import SchedulingError
from epp.server import h2grpc
from epp.server.picking import Pick, PickService
from epp.v1 import picker_pb2, picker_pb2_grpc

PICK_PATH = "/epp.v1.EndpointPicker/Pick"
RELEASE_PATH = "/epp.v1.EndpointPicker/Release"


class PickFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code  # gRPC status code
        self.message = message


class PickAPI:
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

    def pick(self, request: Any) -> Any:
        """PickRequest -> PickResponse; raises PickFailed with a gRPC status code."""
        try:
            req = self._request(request)
        except RequestError as e:
            raise PickFailed(h2grpc.INVALID_ARGUMENT, e.message) from None
        try:
            pick = self.picks.pick(req)
        except SchedulingError as e:
            self.picks.refused(req, e.status)
            code = h2grpc.RESOURCE_EXHAUSTED if e.status == 429 else h2grpc.UNAVAILABLE
            raise PickFailed(code, e.message) from None
        now = time.monotonic()
        self._expire(now)
        pid = uuid.uuid4().hex
        self._open[pid] = (pick, now)
        d = pick.decision
        resp = picker_pb2.PickResponse(endpoint=d.primary, fallback_endpoints=list(d.endpoints[1:]),
                                       reason=d.reason(), pick_id=pid, target_model=req.target_model or req.model,
                                       priority=req.priority)
        for address, (total, parts) in d.scores().items():
            s = resp.scores.add(endpoint=address, total=total)
            for name, v in parts.items():
                s.scores[name] = v
        return resp

    def release(self, request: Any) -> Any:
        entry = self._open.pop(request.pick_id, None)
        if entry is not None:
            if request.HasField("cached_tokens"):
                entry[0].observe_usage(int(request.cached_tokens))
            entry[0].finish()
        return picker_pb2.ReleaseResponse(released=entry is not None)

    # -- HTTP/2 server adapters ---------------------------------------------------------------
    def h2_services(self) -> dict[str, h2grpc.HandlerFactory]:
        return {
            PICK_PATH: lambda resp, _h: _Unary(resp, picker_pb2.PickRequest.FromString, self.pick),
            RELEASE_PATH: lambda resp, _h: _Unary(resp, picker_pb2.ReleaseRequest.FromString, self.release),
        }


class _Unary:
    """A unary call on the HTTP/2 server: one request message, one response."""

    __slots__ = ("call", "message", "parse", "responder")

    def __init__(self, responder: h2grpc.Responder, parse: Any, call: Any) -> None:
        self.responder = responder
        self.parse = parse
        self.call = call
        self.message: bytes | None = None

    def on_message(self, message: bytes) -> None:
        self.message = message

    def on_end(self) -> None:
        if self.message is None:
            self.responder.finish(h2grpc.INVALID_ARGUMENT, "no request message")
            return
        try:
            resp = self.call(self.parse(self.message))
        except PickFailed as e:
            self.responder.finish(e.code, e.message)
            return
        except Exception:  # a malformed protobuf
            self.responder.finish(h2grpc.INVALID_ARGUMENT, "cannot parse the request message")
            return
        self.responder.send(resp.SerializeToString())
        self.responder.finish()

    def on_reset(self) -> None:
        pass


class GrpcioPickAPI(picker_pb2_grpc.EndpointPickerServicer):  # type: ignore[misc]
    """The same API on grpcio (``--grpc-transport=grpcio``)."""

    def __init__(self, api: PickAPI) -> None:
        self.api = api

    async def Pick(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return self.api.pick(request)
        except PickFailed as e:
            await context.abort(grpc.StatusCode(_STATUS[e.code]), e.message)

    async def Release(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.api.release(request)


_STATUS = {c.value[0]: c.value for c in grpc.StatusCode}
