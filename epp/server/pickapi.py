"""epp.v1.EndpointPicker: the scheduler for gateways that are not Envoy.

``PickAPI`` speaks the protocol (synchronous; ``_Unary`` adapts it to epp's HTTP/2 server): the
request goes to the director as ext_proc's does, and the open pick takes the same response side
(ResponseStarted = first bytes, Release's cached_tokens or response tail = usage, Release = end).
With flow control a Pick may wait (a ``HeldPick``): it is answered when the request dispatches,
or DEADLINE_EXCEEDED when the call's grpc-timeout passes first (the request leaves the queue).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from epp.requestcontrol.director import Director
from epp.requestcontrol.pending import Pending
from epp.requestcontrol.refused import Refused
from epp.requestcontrol.routed import RequestInput, ResponseAccess, Routed
from epp.server import h2grpc
from epp.server.auth import TokenFile
from epp.v1 import picker_pb2

PICK_PATH = "/epp.v1.EndpointPicker/Pick"
STARTED_PATH = "/epp.v1.EndpointPicker/ResponseStarted"
RELEASE_PATH = "/epp.v1.EndpointPicker/Release"
MAX_OUTSTANDING = 1024  # unreleased picks per client (--pick-api-max-outstanding)
MAX_REQUEST = 16 * 1024 * 1024  # bytes of one PickRequest

log = logging.getLogger("epp.pickapi")


@dataclass(slots=True)
class _Open:
    pick: Routed
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

    def __init__(self, director: Director, ttl: float = 600.0, max_outstanding: int = MAX_OUTSTANDING,
                 token: TokenFile | None = None) -> None:
        self.director = director
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

    @staticmethod
    def _input(r: Any) -> RequestInput:
        given = RequestInput(dict(r.headers), r.path or "/v1/chat/completions", model=r.model)
        which = r.WhichOneof("input")
        if which == "body":
            given.body = r.body
        elif which == "messages":
            given.messages = [{"role": m.role, "content": m.content} for m in r.messages.messages]
        else:
            given.prompt = r.prompt
        return given

    def pick(self, request: Any, client: str = "local") -> Any:
        """PickRequest -> PickResponse, or a HeldPick (flow control holds the request); raises
        PickFailed with a gRPC status code."""
        now = time.monotonic()
        self._expire(now)
        if self._per_client.get(client, 0) >= self.max_outstanding:
            raise PickFailed(h2grpc.RESOURCE_EXHAUSTED,
                             f"{self.max_outstanding} picks of this client are not released; call Release")
        try:
            out = self.director.submit(self._input(request), ResponseAccess.READ)
        except Refused as e:
            raise PickFailed(e.grpc_code, e.message) from None
        if isinstance(out, Pending):
            return HeldPick(self, out, client)
        return self.opened(out, client)

    def opened(self, pick: Routed, client: str) -> Any:
        """The PickResponse of a committed pick, which stays open until Release."""
        now = time.monotonic()
        req = pick.request
        pid = uuid.uuid4().hex
        self._open[pid] = _Open(pick, client, now)
        self._per_client[client] = self._per_client.get(client, 0) + 1
        d = pick.decision
        targets = d.targets
        resp = picker_pb2.PickResponse(endpoint=targets[0], fallback_endpoints=list(targets[1:]),
                                       reason=d.reason(), pick_id=pid, target_model=req.target_model or req.model,
                                       priority=req.priority)
        for key, value in d.request_headers:
            resp.request_headers[key] = value
        for address, (total, parts) in d.scores().items():
            s = resp.scores.add(endpoint=address, total=total)
            for name, v in parts.items():
                s.scores[name] = v
        # The open pick keeps what Release needs (the decision), not the prompt or the body.
        req.prompt = ""
        req.body = None
        req.headers = {}
        pick.forward_body = None
        return resp

    def response_started(self, request: Any, client: str = "local") -> Any:
        entry = self._open.get(request.pick_id)
        if entry is not None:
            entry.pick.response_started()
        return picker_pb2.ResponseStartedResponse(known=entry is not None)

    def release(self, request: Any, client: str = "local") -> Any:
        entry = self._close(request.pick_id) if request.pick_id in self._open else None
        if entry is not None:
            pick = entry.pick
            if request.HasField("cached_tokens"):
                pick.usage(int(request.cached_tokens))
            elif request.response_tail:
                pick.response_body(request.response_tail, True)  # the usage in it, as ext_proc reads it
            pick.finish()
        return picker_pb2.ReleaseResponse(released=entry is not None)

    # -- HTTP/2 server adapters ---------------------------------------------------------------
    def h2_services(self) -> dict[str, h2grpc.HandlerFactory]:
        return {
            PICK_PATH: lambda resp, h: _Unary(self, resp, h, picker_pb2.PickRequest.FromString, self.pick),
            STARTED_PATH: lambda resp, h: _Unary(self, resp, h, picker_pb2.ResponseStartedRequest.FromString,
                                                 self.response_started),
            RELEASE_PATH: lambda resp, h: _Unary(self, resp, h, picker_pb2.ReleaseRequest.FromString, self.release),
        }


class HeldPick:
    """A Pick flow control holds: ``wait`` answers it once, when it dispatches or is refused,
    or when ``deadline`` seconds pass (it then leaves the queue)."""

    __slots__ = ("_answer", "_timer", "api", "client", "waiting")

    def __init__(self, api: PickAPI, waiting: Pending, client: str) -> None:
        self.api = api
        self.waiting = waiting
        self.client = client
        self._answer: Callable[[Any], None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def wait(self, answer: Callable[[Any], None], deadline: float | None) -> None:
        self._answer = answer
        self.waiting.ready = self._ready
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_later(deadline, self._deadline)

    def _ready(self, result: Routed | Refused) -> None:
        if self._timer is not None:
            self._timer.cancel()
        answer = self._answer
        if isinstance(result, Refused):
            out: Any = PickFailed(result.grpc_code, result.message)
        else:
            out = self.api.opened(result, self.client)
        if answer is not None:
            answer(out)

    def _deadline(self) -> None:
        self.waiting.cancel()
        if self._answer is not None:
            self._answer(PickFailed(h2grpc.DEADLINE_EXCEEDED, "the call's deadline passed while flow control "
                                                              "held the request"))

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.waiting.cancel()


class _Unary:
    """A unary call on the HTTP/2 server: one request message, one response."""

    __slots__ = ("api", "call", "failed", "headers", "held", "message", "parse", "responder")

    def __init__(self, api: PickAPI, responder: h2grpc.Responder, headers: dict[str, str], parse: Any,
                 call: Any) -> None:
        self.api = api
        self.responder = responder
        self.headers = headers
        self.parse = parse
        self.call = call
        self.message: bytes | None = None
        self.failed: PickFailed | None = None
        self.held: HeldPick | None = None

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
        if isinstance(resp, HeldPick):
            self.held = resp
            resp.wait(self._answer_later, h2grpc.grpc_timeout(self.headers))
            return
        self.responder.send(resp.SerializeToString())
        self.responder.finish()

    def _answer_later(self, resp: Any) -> None:
        self.held = None
        if isinstance(resp, PickFailed):
            self.responder.finish(resp.code, resp.message)
        else:
            self.responder.send(resp.SerializeToString())
            self.responder.finish()
        self.responder.flush()

    def on_reset(self) -> None:
        if self.held is not None:  # the client went away while its Pick waited
            self.held.cancel()
            self.held = None
