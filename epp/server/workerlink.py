"""The link between protocol workers (``--workers N``) and the process that holds the routing state.

Workers terminate the gateway's HTTP/2 connections and run the ext_proc state machine; every
decision is made by the one director in the state process, so N workers route exactly as one
process would. Each worker keeps one Unix-socket connection to the state process; messages are
msgpack arrays, several per write (``FLUSH_EVERY`` at a time, the rest at the end of the loop turn):

worker -> state
  ["h", 0, index, pid]    the worker says who it is (first message)
  ["p", rid, headers, path, body, subset, access]  a request to pick for
  ["c", rid]              cancel a held request (its client went away)
  ["s", rid, served]      the endpoint that served
  ["f", rid, streamed]    the response's first bytes (streamed: more chunks to come)
  ["e", rid, status, usage, streamed, bytes, gaps, spent]  the end, as the worker read it
  ["x", rid, status]      the stream ended (no body seen)
  ["y", rid, status, served]  the stream is done with the pick, its observers end it (--observed-responses)
  ["o", rid, token, role] an observer stream claims the pick of ``token`` (its events follow as rid's)
  ["F", 0, token, streamed]  a first observer that stops at the first bytes: the claim and its first bytes
  ["k", 0, outcome]       a response body skip asked / ignored (--allow-mode-override)
  ["u", rid, path, headers, peer, message]  a unary call (the epp.v1 Pick API) relayed
  ["ur", rid]             that call's client went away
state -> worker
  ["r", rid, pick]        a committed pick (``pick_fields``)
  ["n", rid, status, message, param, dropped, headers]  refused
  ["U", rid, status, message, payload]  a relayed unary answer
  ["v", rid]              revoke the pick (in-flight eviction): the stream answers 429 and ends

Response bodies stay in the worker (echoed there, usage read there); the state process hears
only the events that change routing state. When a worker's link drops, the state process ends
everything that worker held (in-flight counts released, held requests cancelled).

With --observed-responses the serving process registers each pick for its observers (the token
goes to the worker with the pick); an observer stream, on whichever worker its connection
reached, claims it with ``o`` under a new rid of its link, and its first bytes and end follow as
that rid's ``f`` / ``e`` / ``x``: the link is ordered, so nothing waits for an answer. A first
observer that stops at the first bytes (its token says so) needs nothing before them: one ``F``.
The pick stream that handed its pick over tells the endpoint that served with its ``y``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import msgpack

from epp.requestcontrol.director import Director
from epp.requestcontrol.frontend import Ready, RoutedSide
from epp.requestcontrol.pending import Pending
from epp.requestcontrol.refused import Refused
from epp.requestcontrol.routed import RequestInput, ResponseAccess, Routed
from epp.requestcontrol.usage import UsageReader
from epp.scheduling.types import Usage
from epp.server import h2grpc
from epp.server.extproc import BodySkips
from epp.server.observed import END, FIRST, Claim, ObservedPicks, reads_to_end

log = logging.getLogger("epp.workers")

ACCESS = (ResponseAccess.NONE, ResponseAccess.READ, ResponseAccess.INJECT)
# Messages written at once at most: a batch read from many streams goes on in parts, so the two
# ends work on it side by side rather than in turn (a whole batch per write kept each end idle
# while the other worked: a pipeline of two processes ran as one).
FLUSH_EVERY = 32
MAX_GAPS = 4096  # inter-chunk gaps a worker reports per response (the ITL series), at most


class _Link(asyncio.Protocol):
    """Framing shared by both ends: msgpack arrays in, batched writes out."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 30)
        self._out: list[bytes] = []
        self._flush_soon = False
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def data_received(self, data: bytes) -> None:
        self._unpacker.feed(data)
        for message in self._unpacker:
            try:
                self.on_message(message)
            except Exception:  # one bad message must not end the link
                log.exception("worker link: message %r failed", message[:2] if isinstance(message, list) else "?")

    def send(self, message: list[Any]) -> None:
        out = self._out
        out.append(self._pack(message))
        if len(out) >= FLUSH_EVERY:  # the other end starts on these while this one goes on
            self._flush()
        elif not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._turn_ended)

    def _turn_ended(self) -> None:
        self._flush_soon = False
        self._flush()

    def _flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def on_message(self, message: Any) -> None:
        raise NotImplementedError


# -- the state process's end ---------------------------------------------------------------------
UnaryFactory = Callable[[h2grpc.Responder, dict[str, str]], h2grpc.RpcHandler]


class _RelayedResponder:
    """A unary handler's responder in the state process: its answer goes back over the link."""

    __slots__ = ("_link", "_peer", "_rid", "payload")

    def __init__(self, link: StateEnd, rid: int, peer: str) -> None:
        self._link, self._rid, self._peer = link, rid, peer
        self.payload = b""

    @property
    def peer(self) -> str:
        return self._peer

    def send(self, message: bytes) -> None:
        self.payload = message

    def finish(self, status: int = h2grpc.OK, message: str = "") -> None:
        self._link.unary.pop(self._rid, None)
        self._link.send(["U", self._rid, status, message, self.payload])

    def flush(self) -> None:
        pass


class StateEnd(_Link):
    """One worker's link, in the state process: its requests go to the director."""

    def __init__(self, director: Director, services: dict[str, UnaryFactory], on_lost: Callable[[StateEnd], None],
                 skips: BodySkips | None = None, explain: bool = False, scores: bool = False,
                 observed: ObservedPicks | None = None) -> None:
        """``explain``, ``scores``: the workers emit decision headers / endpoint scores; ``observed``:
        the picks' observer streams read their responses (--observed-responses)."""
        super().__init__()
        self.director = director
        self.observed = observed
        self.explain, self.scores = explain, scores
        self.skips = skips
        self.services = services
        self.on_lost = on_lost
        self.routed: dict[int, Routed] = {}
        self.pending: dict[int, Pending] = {}
        self.unary: dict[int, h2grpc.RpcHandler] = {}
        self.index = -1  # the worker's, once it said hello
        self.pid = 0
        self.requests = 0  # picks asked through this link
        self.claims = 0  # observer streams that found their pick through this link (--observed-responses)
        self._ends_a_read: dict[int, bool] = {}  # end observers: does the pick's first observer read to the end
        self._handlers: dict[str, Callable[[int, Any], None]] = {
            "p": self._pick, "s": self._served, "f": self._first_bytes, "e": self._ended, "x": self._stream_ended,
            "c": self._cancel, "u": self._unary_call, "ur": self._unary_gone, "k": self._skip, "h": self._hello,
            "y": self._handed_over, "o": self._observer_claim, "F": self._first_observed}

    def connection_lost(self, exc: Exception | None) -> None:
        """The worker died (or stopped): nothing it held stays counted."""
        for p in list(self.pending.values()):
            p.cancel()
        for r in list(self.routed.values()):
            r.finish()
        for u in list(self.unary.values()):
            u.on_reset()
        self.pending.clear()
        self.routed.clear()
        self._ends_a_read.clear()
        self.unary.clear()
        self.transport = None
        self.on_lost(self)

    def on_message(self, m: Any) -> None:
        handler = self._handlers.get(m[0])
        if handler is not None:
            handler(m[1], m)

    def _pick(self, rid: int, m: Any) -> None:
        self.requests += 1
        self._submit(rid, m)

    def _served(self, rid: int, m: Any) -> None:
        routed = self.routed.get(rid)
        if routed is not None:
            routed.served_by(m[2])

    def _first_bytes(self, rid: int, m: Any) -> None:
        routed = self.routed.get(rid)
        if routed is not None:
            routed.first_bytes()
            routed.streamed = routed.streamed or m[2]  # (a first observer that stops here tells no end)

    def _ended(self, rid: int, m: Any) -> None:
        routed = self.routed.pop(rid, None)
        if routed is not None:
            if m[2]:  # (an observer stream does not see the status: the pick stream told it)
                routed.status = m[2]
            usage = Usage(*m[3]) if m[3] is not None else None
            routed.ended_elsewhere(usage, m[4], m[5], m[6], m[7])

    def _stream_ended(self, rid: int, m: Any) -> None:
        routed = self.routed.pop(rid, None)
        if routed is not None:
            if m[2]:
                routed.status = m[2]
            if self.observed is not None and rid in self._ends_a_read:
                # An end observer's close: a first observer reading to the end may bring the last
                # chunk (the usage) a moment later through another worker's link.
                self.observed.end(routed, self._ends_a_read.pop(rid))
            else:
                routed.finish()
        self._cancel(rid, m)

    def _handed_over(self, rid: int, m: Any) -> None:
        routed = self.routed.pop(rid, None)
        if routed is not None:
            if m[2]:
                routed.status = m[2]
            if m[3]:
                routed.served_by(m[3])

    def _claim(self, token: str, role: str) -> tuple[Routed, bool] | None:
        claim = self.observed.claim(token, role) if self.observed is not None else None
        if claim is None or not isinstance(claim.pick, Routed):
            return None
        self.claims += 1
        return claim.pick, claim.read_to_end

    def _first_observed(self, rid: int, m: Any) -> None:
        claimed = self._claim(m[2], FIRST)
        if claimed is not None:
            routed = claimed[0]
            routed.first_bytes()
            routed.streamed = routed.streamed or m[3]

    def _observer_claim(self, rid: int, m: Any) -> None:
        claimed = self._claim(m[2], m[3])
        if claimed is not None:
            self.routed[rid] = claimed[0]
            if m[3] == END:
                self._ends_a_read[rid] = claimed[1]

    def _cancel(self, rid: int, m: Any) -> None:
        held = self.pending.pop(rid, None)
        if held is not None:
            held.cancel()

    def _unary_call(self, rid: int, m: Any) -> None:
        self._unary(rid, m[2], m[3], m[4], m[5])

    def _unary_gone(self, rid: int, m: Any) -> None:
        handler = self.unary.pop(rid, None)
        if handler is not None:
            handler.on_reset()

    def _skip(self, rid: int, m: Any) -> None:
        if self.skips is not None:
            self.skips.ask() if m[2] == "asked" else self.skips.ignored()

    def _hello(self, rid: int, m: Any) -> None:
        self.index, self.pid = m[2], m[3]

    def _submit(self, rid: int, m: Any) -> None:
        given = RequestInput(m[2], m[3], m[4], subset=tuple(m[5]) if m[5] is not None else None)

        def ready(result: RoutedSide | Refused) -> None:
            self.pending.pop(rid, None)
            if isinstance(result, Refused):
                self._refused(rid, result)
            elif self.transport is None:  # the worker is gone: nothing to hand it to
                result.finish()
            else:
                assert isinstance(result, Routed)
                self._routed(rid, result)

        try:
            out = self.director.submit(given, ACCESS[m[6]], ready)
        except Refused as e:
            self._refused(rid, e)
            return
        if isinstance(out, Pending):
            self.pending[rid] = out
            if out.result is not None:
                ready(out.result)
            return
        self._routed(rid, out)

    def _routed(self, rid: int, r: Routed) -> None:
        self.routed[rid] = r
        if self.observed is None:  # (observed mode: the worker's pick stream ends at the pick)
            r.revoke = lambda: self.send(["v", rid])
        fields = pick_fields(r, self.explain, self.scores)
        fields.append(self.observed.register(r) if self.observed is not None else "")
        self.send(["r", rid, fields])

    def _refused(self, rid: int, e: Refused) -> None:
        self.send(["n", rid, e.status, e.message, e.param, e.dropped, [list(h) for h in e.headers]])

    def _unary(self, rid: int, path: str, headers: dict[str, str], peer: str, message: bytes) -> None:
        factory = self.services.get(path)
        if factory is None:
            self.send(["U", rid, h2grpc.UNIMPLEMENTED, f"unknown method {path}", b""])
            return
        handler = factory(_RelayedResponder(self, rid, peer), headers)
        self.unary[rid] = handler
        handler.on_message(message)
        handler.on_end()


def pick_fields(r: Routed, explain: bool, scores: bool) -> list[Any]:
    """What a worker needs of a committed pick to answer the gateway and read the response: the
    destination and request mutations, the response headers for each endpoint that may serve
    (the primary, the fallbacks), the decision headers and scores when the worker emits them,
    and what to read."""
    d = r.decision
    endpoints = list(d.endpoints)
    headers = {e: [list(h) for h in r.response_headers_for(e, False)] for e in endpoints}
    reader = 0 if r.reader is None else 2 if r.reader.strip else 1
    return [r.header_value, [list(h) for h in r.request_headers], list(r.removed_headers), r.forward_body,
            r.endpoint_scores() if scores else {}, headers, [list(h) for h in r.explain()] if explain else [],
            endpoints, list(d.destinations or ()), reader, r.watch_response, r.streaming(), r.revocable]


def _observer_fields(read_to_end: bool) -> list[Any]:
    """``pick_fields`` for an observer stream's side: no destination, the usage read when it reads to the end."""
    return ["", [], [], None, {}, {}, [], [""], [], 1 if read_to_end else 0, True, True, False, ""]


# -- a worker's end --------------------------------------------------------------------------------
class RemoteRouted:
    """A pick made in the state process, as a worker's ext_proc stream uses it (RoutedSide)."""

    __slots__ = (
        "_by_endpoint",
        "_bytes",
        "_destinations",
        "_endpoints",
        "_explained",
        "_first",
        "_gaps",
        "_header_value",
        "_last",
        "_link",
        "_removed",
        "_request_headers",
        "_rid",
        "_scores",
        "_served",
        "_spent",
        "_streaming",
        "done",
        "endpoint",
        "forward_body",
        "prefilled",
        "reader",
        "revocable",
        "revoke",
        "status",
        "streamed",
        "token",
        "usage_required",
        "wants_chunks",
        "watch_response",
    )

    def __init__(self, link: WorkerEnd, rid: int, f: list[Any]) -> None:
        self._link, self._rid = link, rid
        (self._header_value, request_headers, removed, self.forward_body, self._scores, self._by_endpoint,
         self._explained, self._endpoints, self._destinations, reader, self.watch_response, self._streaming,
         self.revocable, self.token) = f
        self._request_headers = tuple(tuple(h) for h in request_headers)
        self._removed = tuple(removed)
        self.reader = UsageReader(strip=reader == 2) if reader else None
        self.usage_required = True  # (a worker reads every response it is sent)
        self.endpoint = self._endpoints[0]
        self.status = 0
        self.done = False
        self.prefilled = False
        self.streamed = False
        self.wants_chunks = True
        self._bytes: int | None = None
        self._gaps: list[float] = []
        self._last = 0.0
        self._first = 0.0
        self._spent = 0.0  # seconds this worker spent on the response body (epp's processing time)
        self._served = ""  # the endpoint that served, not told yet
        self.revoke: Callable[[], None] | None = None  # the worker's stream's, when it can end the request

    @property
    def header_value(self) -> str:
        return str(self._header_value)

    @property
    def request_headers(self) -> tuple[tuple[str, str], ...]:
        return self._request_headers

    @property
    def removed_headers(self) -> tuple[str, ...]:
        return self._removed

    def endpoint_scores(self) -> dict[str, float]:
        return dict(self._scores)

    def response_headers(self, explain: bool) -> tuple[tuple[str, str], ...]:
        own = self._by_endpoint.get(self.endpoint, [])
        return tuple(tuple(h) for h in (own + self._explained if explain else own))

    def served_by(self, endpoint: str) -> None:
        if self._destinations and endpoint in self._destinations:
            endpoint = self._endpoints[self._destinations.index(endpoint)]
        if endpoint in self._endpoints:
            self.endpoint = endpoint
        if self.token:  # handed over to its observers: told with the hand-over (or the end)
            self._served = endpoint
            return
        self._link.send(["s", self._rid, endpoint])

    def response_body(self, data: bytes, eos: bool) -> bytes:
        now = time.perf_counter()
        self._bytes = (self._bytes or 0) + len(data)
        if data:
            if not self.prefilled:
                self.prefilled = True
                self.streamed = not eos
                self.wants_chunks = self.reader is not None
                self._link.send(["f", self._rid, self.streamed])
            elif self.streamed and self._last and self._streaming and len(self._gaps) < MAX_GAPS:
                self._gaps.append(now - self._last)
            self._last = now
        if self.reader is not None:
            data = self.reader.feed(data, eos)
        self._spent += time.perf_counter() - now
        if eos:
            self.finish()
        return data

    @classmethod
    def observing(cls, link: WorkerEnd, rid: int, read_to_end: bool) -> RemoteRouted:
        """An observer stream's side of a pick the state process holds (its claim sent as ``rid``):
        no destination of its own, the usage read when it reads to the end."""
        return cls(link, rid, _observer_fields(read_to_end))

    def hand_over(self) -> None:
        if not self.done:
            self.done = True
            self._link.routed.pop(self._rid, None)
            self._link.send(["y", self._rid, self.status, self._served])

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.revoke = None  # (the stream's: no cycle left for the collector)
        self._link.routed.pop(self._rid, None)
        if self._served:
            self._link.send(["s", self._rid, self._served])
        r = self.reader
        usage = [r.prompt_tokens, r.cached_tokens, r.completion_tokens] if r is not None and r.completion_tokens \
            else None
        if self._bytes is None and usage is None:
            self._link.send(["x", self._rid, self.status])  # no body seen here: the state side ends it as is
        else:
            self._link.send(["e", self._rid, self.status, usage, self.streamed, self._bytes, self._gaps, self._spent])


class RemotePending(Pending):
    """A request sent to the state process, its pick not back yet."""

    __slots__ = ("_link", "_rid")

    def __init__(self, link: WorkerEnd, rid: int) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # the request lives in the state process
        self._link, self._rid = link, rid

    def cancel(self) -> None:
        if self._link.waiting.pop(self._rid, None) is not None:
            self._link.send(["c", self._rid])


class WorkerEnd(_Link):
    """A worker's link to the state process: the PickService its ext_proc streams use."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        super().__init__()
        self.on_lost = on_lost
        self._next = 0
        self.waiting: dict[int, RemotePending] = {}
        self.routed: dict[int, RemoteRouted] = {}
        self.calls: dict[int, Callable[[int, str, bytes], None]] = {}

    def rid(self) -> int:
        self._next += 1
        return self._next

    def submit(self, given: RequestInput, access: ResponseAccess = ResponseAccess.NONE,
               ready: Ready | None = None) -> RoutedSide | Pending:
        if self.transport is None or self.transport.is_closing():
            raise Refused(503, "the picker's state process is not reachable from this worker")
        rid = self.rid()
        held = RemotePending(self, rid)
        held.ready = ready
        self.waiting[rid] = held
        subset = list(given.subset) if given.subset is not None else None
        self.send(["p", rid, dict(given.headers), given.path, given.body, subset, ACCESS.index(access)])
        return held

    def call(self, path: str, headers: dict[str, str], peer: str, message: bytes,
             answer: Callable[[int, str, bytes], None]) -> int:
        rid = self.rid()
        self.calls[rid] = answer
        self.send(["u", rid, path, headers, peer, message])
        return rid

    def forget_call(self, rid: int) -> None:
        if self.calls.pop(rid, None) is not None:
            self.send(["ur", rid])

    def on_message(self, m: Any) -> None:
        kind, rid = m[0], m[1]
        if kind == "U":
            answer = self.calls.pop(rid, None)
            if answer is not None:
                answer(m[2], m[3], m[4])
            return
        if kind == "v":
            routed = self.routed.get(rid)
            if routed is not None and routed.revoke is not None:
                routed.revoke()
            return
        held = self.waiting.pop(rid, None)
        if held is None:
            if kind == "r":  # cancelled meanwhile: the pick ends at once
                self.send(["x", rid, 0])
            return
        if kind == "r":
            routed = RemoteRouted(self, rid, m[2])
            self.routed[rid] = routed
            held.deliver(routed)  # type: ignore[arg-type]
        elif kind == "n":
            held.deliver(Refused(m[2], m[3], m[4], dropped=m[5], headers=tuple((k, v) for k, v in m[6])))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        refused = Refused(503, "the picker's state process went away")
        for held in list(self.waiting.values()):
            held.deliver(refused)
        self.waiting.clear()
        for answer in list(self.calls.values()):
            answer(h2grpc.UNAVAILABLE, "the picker's state process went away", b"")
        self.calls.clear()
        self.on_lost()


class RelayedObservers:
    """A worker's ObserverRegistry: picks are registered in the serving process (the token comes
    with the pick), and claimed there through the link."""

    __slots__ = ("_link",)

    def __init__(self, link: WorkerEnd) -> None:
        self._link = link

    def register(self, pick: RoutedSide) -> str:
        if not isinstance(pick, RemoteRouted) or not pick.token:
            raise RuntimeError("the serving process registered no observers for this pick (--observed-responses "
                               "is set in the worker only)")
        return str(pick.token)

    def end(self, pick: RoutedSide, read_to_end: bool) -> None:
        pick.finish()  # (the serving process waits for the reader, if one reads to the end)

    def claim(self, token: str, role: str) -> Claim | None:
        link = self._link
        if link.transport is None or link.transport.is_closing():
            return None
        if role == FIRST and not reads_to_end(token):
            return Claim(_FirstBytes(link, token), False)
        rid = link.rid()
        link.send(["o", rid, token, role])
        side = RemoteRouted.observing(link, rid, reads_to_end(token))
        link.routed[rid] = side
        return Claim(side, reads_to_end(token))


class _FirstBytes(RemoteRouted):
    """A first observer's side that stops at the first bytes: it claims and tells them in one
    ``F`` (nothing is needed of the pick before them); a stream that ends before them tells nothing
    (the end observer ends the pick)."""

    __slots__ = ("_token",)

    def __init__(self, link: WorkerEnd, token: str) -> None:
        super().__init__(link, 0, _observer_fields(False))
        self._token = token

    def response_body(self, data: bytes, eos: bool) -> bytes:
        if data and not self.done:
            self.done = True
            self.prefilled = True
            self.wants_chunks = False
            self._link.send(["F", 0, self._token, not eos])
        return data

    def hand_over(self) -> None:
        self.done = True

    def finish(self) -> None:
        self.done = True


class RelayedSkips:
    """A worker's response body skips, counted (and warned about) in the state process."""

    __slots__ = ("_link",)

    def __init__(self, link: WorkerEnd) -> None:
        self._link = link

    def ask(self) -> None:
        self._link.send(["k", 0, "asked"])

    def ignored(self) -> None:
        self._link.send(["k", 0, "ignored"])


class RelayedUnary:
    """A unary call (the epp.v1 Pick API) in a worker: relayed to the state process."""

    __slots__ = ("_extra", "_headers", "_link", "_message", "_path", "_rid", "responder")

    def __init__(self, link: WorkerEnd, path: str, responder: h2grpc.Responder, headers: dict[str, str]) -> None:
        self._link, self._path, self.responder, self._headers = link, path, responder, headers
        self._message: bytes | None = None
        self._extra = False
        self._rid = 0

    def on_message(self, message: bytes) -> None:
        if self._message is None:
            self._message = message
        else:
            self._extra = True

    def on_end(self) -> None:
        if self._extra:
            self.responder.finish(h2grpc.INVALID_ARGUMENT, "a unary call takes one message")
            return
        if self._link.transport is None:
            self.responder.finish(h2grpc.UNAVAILABLE, "the picker's state process is not reachable from this worker")
            return
        wanted = {k: v for k, v in self._headers.items() if k in ("authorization", "grpc-timeout")}
        self._rid = self._link.call(self._path, wanted, self.responder.peer, self._message or b"", self._answer)

    def _answer(self, status: int, message: str, payload: bytes) -> None:
        self._rid = 0
        if payload:
            self.responder.send(payload)
        self.responder.finish(status, message)
        self.responder.flush()

    def on_reset(self) -> None:
        if self._rid:
            self._link.forget_call(self._rid)
