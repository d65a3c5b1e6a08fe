"""epp.v1.EndpointPicker: the scheduler for gateways that are not Envoy.

``PickAPI`` holds the logic (synchronous); the HTTP/2 server and grpcio adapt it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import grpc

from epp.request import InferenceRequest, RequestError, parse_body, prompt_of_messages, route_path
from epp.scheduling.types import SchedulingError
from epp.server import h2grpc
from epp.server.auth import TokenFile
from epp.server.picking import Pick, PickService
from epp.v1 import picker_pb2, picker_pb2_grpc

PICK_PATH = "/epp.v1.EndpointPicker/Pick"
RELEASE_PATH = "/epp.v1.EndpointPicker/Release"
MAX_OUTSTANDING = 1024  # unreleased picks per client (--pick-api-max-outstanding)
MAX_REQUEST = 16 * 1024 * 1024  # bytes of one PickRequest

log = logging.getLogger("epp.pickapi")


@dataclass(slots=True)
class _Open:
    pick: Pick
    client: str
    at: float


class PickFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code  # gRPC status code
        self.message = message


class PickAPI:
    """Pick / Release; picks not released within ``ttl`` seconds are released automatically.

    An open pick keeps its decision, never the prompt; a client (by address) holds at most
    ``max_outstanding`` of them; with ``token`` every call needs ``authorization: Bearer``."""

    def __init__(self, picks: PickService, ttl: float = 600.0, max_outstanding: int = MAX_OUTSTANDING,
                 token: TokenFile | None = None) -> None:
        self.picks = picks
        self.ttl = ttl
        self.max_outstanding = max_outstanding
        self.token = token
        self._open: OrderedDict[str, _Open] = OrderedDict()  # oldest first
        self._per_client: dict[str, int] = {}

    @property
    def outstanding(self) -> int:
        return len(self._open)

    def _expire(self, now: float) -> None:
        while self._open:
            pid, entry = next(iter(self._open.items()))
            if now - entry.at <= self.ttl:
                return
            self._close(pid).pick.finish()

    def _close(self, pid: str) -> _Open:
        entry = self._open.pop(pid)
        left = self._per_client[entry.client] - 1
        if left:
            self._per_client[entry.client] = left
        else:
            del self._per_client[entry.client]
        return entry

    def check_auth(self, headers: dict[str, str]) -> None:
        if self.token is not None and not self.token.allows(headers.get("authorization")):
            raise PickFailed(h2grpc.UNAUTHENTICATED, "missing or wrong bearer token")

    def _request(self, r: Any) -> InferenceRequest:
        headers = dict(r.headers)
        path = route_path(r.path or "/v1/chat/completions")
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

    def pick(self, request: Any, client: str = "local") -> Any:
        """PickRequest -> PickResponse; raises PickFailed with a gRPC status code."""
        now = time.monotonic()
        self._expire(now)
        if self._per_client.get(client, 0) >= self.max_outstanding:
            raise PickFailed(h2grpc.RESOURCE_EXHAUSTED,
                             f"{self.max_outstanding} picks of this client are not released; call Release")
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
        pid = uuid.uuid4().hex
        self._open[pid] = _Open(pick, client, now)
        self._per_client[client] = self._per_client.get(client, 0) + 1
        d = pick.decision
        resp = picker_pb2.PickResponse(endpoint=d.primary, fallback_endpoints=list(d.endpoints[1:]),
                                       reason=d.reason(), pick_id=pid, target_model=req.target_model or req.model,
                                       priority=req.priority)
        for address, (total, parts) in d.scores().items():
            s = resp.scores.add(endpoint=address, total=total)
            for name, v in parts.items():
                s.scores[name] = v
        # The open pick keeps what Release needs (the decision), not the prompt or the body.
        req.prompt = ""
        req.body = None
        req.headers = {}
        return resp

    def release(self, request: Any, client: str = "local") -> Any:
        entry = self._close(request.pick_id) if request.pick_id in self._open else None
        if entry is not None:
            if request.HasField("cached_tokens"):
                entry.pick.observe_usage(int(request.cached_tokens))
            entry.pick.finish()
        return picker_pb2.ReleaseResponse(released=entry is not None)

    # -- HTTP/2 server adapters ---------------------------------------------------------------
    def h2_services(self) -> dict[str, h2grpc.HandlerFactory]:
        return {
            PICK_PATH: lambda resp, h: _Unary(self, resp, h, picker_pb2.PickRequest.FromString, self.pick),
            RELEASE_PATH: lambda resp, h: _Unary(self, resp, h, picker_pb2.ReleaseRequest.FromString, self.release),
        }


class _Unary:
    """A unary call on the HTTP/2 server: one request message, one response."""

    __slots__ = ("api", "call", "failed", "headers", "message", "parse", "responder")

    def __init__(self, api: PickAPI, responder: h2grpc.Responder, headers: dict[str, str], parse: Any,
                 call: Any) -> None:
        self.api = api
        self.responder = responder
        self.headers = headers
        self.parse = parse
        self.call = call
        self.message: bytes | None = None
        self.failed: PickFailed | None = None

    def on_message(self, message: bytes) -> None:
        if self.message is not None:
            self.failed = PickFailed(h2grpc.INVALID_ARGUMENT, "a unary call takes one message")
        elif len(message) > MAX_REQUEST:
            self.failed = PickFailed(h2grpc.RESOURCE_EXHAUSTED,
                                     f"request of {len(message)} bytes exceeds {MAX_REQUEST}")
        self.message = b"" if self.failed else message

    def on_end(self) -> None:
        if self.failed is not None:
            self.responder.finish(self.failed.code, self.failed.message)
            return
        if self.message is None:
            self.responder.finish(h2grpc.INVALID_ARGUMENT, "no request message")
            return
        try:
            self.api.check_auth(self.headers)
            try:
                request = self.parse(self.message)
            except Exception:  # DecodeError and friends: the client's bytes
                raise PickFailed(h2grpc.INVALID_ARGUMENT, "cannot parse the request message") from None
            resp = self.call(request, self.responder.peer)
        except PickFailed as e:
            self.responder.finish(e.code, e.message)
            return
        except Exception as e:  # epp's bug, not the client's: logged, and said so
            log.exception("Pick API call failed")
            self.responder.finish(h2grpc.INTERNAL, f"internal error: {type(e).__name__}")
            return
        self.message = None
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
            self.api.check_auth(dict(context.invocation_metadata() or ()))
            return self.api.pick(request, _peer_host(context.peer()))
        except PickFailed as e:
            await context.abort(grpc.StatusCode(_STATUS[e.code]), e.message)

    async def Release(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self.api.check_auth(dict(context.invocation_metadata() or ()))
        except PickFailed as e:
            await context.abort(grpc.StatusCode(_STATUS[e.code]), e.message)
        return self.api.release(request, _peer_host(context.peer()))


def _peer_host(peer: str) -> str:
    """grpcio's 'ipv4:1.2.3.4:5678' -> '1.2.3.4'."""
    kind, _, rest = peer.partition(":")
    return rest.rpartition(":")[0] if kind in ("ipv4", "ipv6") else peer


_STATUS = {c.value[0]: c.value for c in grpc.StatusCode}
