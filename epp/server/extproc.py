"""Envoy ext_proc (envoy.service.ext_proc.v3.ExternalProcessor/Process), one stream per request.

``ExtProcStream`` is a synchronous state machine: each ProcessingRequest in, zero or more
serialized ProcessingResponses out. It does no I/O (``H2ExtProc`` adapts it to epp's HTTP/2
server) and speaks the protocol only: what to do with the request and its response is the
director's (epp.requestcontrol), which gets the headers, the body and the response chunks.

Body modes, read from the first message's ``protocol_config`` (FULL_DUPLEX_STREAMED if absent):
- FULL_DUPLEX_STREAMED (what Gateway API implementations configure): the headers answer is held
  until the body's end_of_stream (usually an empty last chunk); then the pick goes out as the
  HeadersResponse (header + ``envoy.lb`` metadata), followed by the body as streamed_response
  pieces, exactly one of them with end_of_stream. Response headers, every response body chunk
  (same bytes, same end_of_stream, so SSE flows unchanged) and trailers are answered in turn.
- BUFFERED: headers continue; the pick rides on the BodyResponse; the body is untouched.
- STREAMED / NONE, and requests without a body: pick from headers in the HeadersResponse.
Errors become an ImmediateResponse with an OpenAI-style JSON body. A request's in-flight count
ends at the response's end_of_stream, its trailers, or the stream's end, whichever comes first.

Skipping response bodies (``ResponseBodySkips``, --allow-mode-override): when the gateway's filter
sets ``allow_mode_override``, its request body mode is not FULL_DUPLEX_STREAMED and its response
body is sent (STREAMED, BUFFERED, BUFFERED_PARTIAL), and nothing in epp reads a response's body
(``Routed.watch_response``), the response headers answer also carries a ``mode_override`` with
the response body and trailers off: Envoy then sends none of its chunks and ends the stream when
the response ends, which finishes the request. (Envoy 1.40 ignores overrides while either body
mode is FULL_DUPLEX_STREAMED: epp does not ask then.) A gateway that sends the body anyway is
logged once and counted.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter

from epp.requestcontrol.frontend import PickService, RoutedSide
from epp.requestcontrol.pending import Pending
from epp.requestcontrol.refused import DROPPED_REASON_HEADER, EVICTED, Refused
from epp.requestcontrol.routed import RequestInput, ResponseAccess
from epp.server import h2grpc
from epp.server.observed import ALL, END, FIRST, PICK_TOKEN_HEADER, ROLE_HEADER, ObserverRegistry, ObserverStream

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
METHOD_PATH = f"/{SERVICE}/Process"
DEST_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
SCORES_KEY = "x-gateway-destination-endpoint-scores"  # in LB_NAMESPACE, with --emit-endpoint-scores
SERVED_KEY = "x-gateway-destination-endpoint-served"  # in LB_NAMESPACE of the response's metadata
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
PIECE = 62_000  # bytes per streamed_response piece (as the reference)

NONE = processing_mode_pb2.ProcessingMode.NONE
STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
BUFFERED_PARTIAL = processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Body modes this state machine implements. Any other value (GRPC = 5 in newer Envoys, or a
# value not yet defined) is served as STREAMED: pick from the headers, pass the body through.
KNOWN_MODES = frozenset((NONE, STREAMED, BUFFERED, BUFFERED_PARTIAL, FULL_DUPLEX))
SKIPPABLE = frozenset((STREAMED, BUFFERED, BUFFERED_PARTIAL))  # response body modes an override can turn off


def _ser(resp: pb.ProcessingResponse) -> bytes:
    out: bytes = resp.SerializeToString()
    return out


# Constant answers, serialised once.
CONTINUE_REQUEST_HEADERS = _ser(pb.ProcessingResponse(request_headers=pb.HeadersResponse()))
CONTINUE_RESPONSE_HEADERS = _ser(pb.ProcessingResponse(response_headers=pb.HeadersResponse()))
CONTINUE_REQUEST_BODY = _ser(pb.ProcessingResponse(request_body=pb.BodyResponse()))
CONTINUE_RESPONSE_BODY = _ser(pb.ProcessingResponse(response_body=pb.BodyResponse()))
CONTINUE_REQUEST_TRAILERS = _ser(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
CONTINUE_RESPONSE_TRAILERS = _ser(pb.ProcessingResponse(response_trailers=pb.TrailersResponse()))


log = logging.getLogger("epp.extproc")

# The override a response headers answer carries to skip the rest of the response: body and
# trailers off (the header phases it names are over by then).
SKIP_RESPONSE_BODY = _ser(pb.ProcessingResponse(mode_override=processing_mode_pb2.ProcessingMode(
    response_body_mode=processing_mode_pb2.ProcessingMode.NONE,
    response_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP)))


class BodySkips(Protocol):
    """Where a stream reports that it asked to skip a response body, and that the gateway sent it anyway."""

    def ask(self) -> None: ...

    def ignored(self) -> None: ...


class ResponseBodySkips:
    """The process's asks to skip response bodies (one per server, shared by its streams)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.counter = Counter("epp_response_body_skips_total", "Responses whose body epp asked the gateway not "
                               "to send (--allow-mode-override), and those it sent anyway (ignored).", ["outcome"],
                               registry=registry)
        self.asked, self._ignored = self.counter.labels("asked"), self.counter.labels("ignored")
        self.warned = False

    def ask(self) -> None:
        self.asked.inc()

    def ignored(self) -> None:
        self._ignored.inc()
        if not self.warned:
            self.warned = True
            log.warning("the gateway sent a response body epp asked it to skip: its ext_proc filter needs "
                        "allow_mode_override: true and a request_body_mode other than FULL_DUPLEX_STREAMED "
                        "(Envoy ignores overrides then); epp keeps reading bodies it is sent")


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_VARINTS = [bytes((i,)) for i in range(0x80)]


# Field tags (field number << 3 | wire type 2): ProcessingResponse.request_body = 3,
# .response_body = 4; BodyResponse.response = 1; CommonResponse.body_mutation = 3;
# BodyMutation.streamed_response = 3; StreamedBodyResponse.body = 1 (end_of_stream = 2, varint).
_PHASE_TAG = {"request": b"\x1a", "response": b"\x22"}


def _streamed(phase: str, body: bytes, eos: bool) -> bytes:
    """ProcessingResponse{<phase>_body{response{body_mutation{streamed_response{body, eos}}}}},
    encoded directly: this runs for every body chunk in both directions. The four wrapper
    lengths are computed, so the body is copied once."""
    n = len(body)
    head = b"\x0a" + _varint(n) if n else b""
    inner = len(head) + n + (2 if eos else 0)
    sr = _varint(inner)  # StreamedBodyResponse
    bm_len = 1 + len(sr) + inner
    bm = _varint(bm_len)  # BodyMutation
    cr_len = 1 + len(bm) + bm_len
    cr = _varint(cr_len)  # CommonResponse
    br_len = 1 + len(cr) + cr_len
    prefix = b"".join((_PHASE_TAG[phase], _varint(br_len), b"\x0a", cr, b"\x1a", bm, b"\x1a", sr, head))
    return prefix + body + b"\x10\x01" if eos else prefix + body


EMPTY_REQUEST_EOS = _streamed("request", b"", True)
EMPTY_RESPONSE_EOS = _streamed("response", b"", True)


def _headers(msg: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _status_and_served(msg: pb.HttpHeaders) -> tuple[int, str]:
    """The response's ``:status`` (0 when absent or not a number) and the served-endpoint header
    a gateway's route adds (``epp gateway`` does; "" when absent)."""
    status, served = 0, ""
    for h in msg.headers.headers:
        if h.key == ":status":
            value = h.raw_value or h.value.encode()
            status = int(value) if value.isdigit() else 0
        elif h.key == SERVED_KEY:
            served = (h.raw_value or h.value.encode()).decode("ascii", "replace")
    return status, served


def _pick_mutation(value: str, request_id: str | None,
                   extra: tuple[tuple[str, str], ...] = (), removed: tuple[str, ...] = ()) -> pb.CommonResponse:
    mutation = pb.HeaderMutation()
    if removed:  # the client's API key, which the model server must not see
        mutation.remove_headers.extend(removed)
    opt = mutation.set_headers.add()
    opt.header.key = DEST_HEADER
    opt.header.raw_value = value.encode()
    opt.append_action = OVERWRITE
    for key, header_value in extra:  # for the server (a data-parallel rank)
        opt = mutation.set_headers.add()
        opt.header.key = key
        opt.header.raw_value = header_value.encode()
        opt.append_action = OVERWRITE
    if request_id is not None:
        opt = mutation.set_headers.add()
        opt.header.key = "x-request-id"
        opt.header.raw_value = request_id.encode()
        opt.append_action = OVERWRITE
    # As the reference: the gateway re-evaluates the route with the headers epp set (a route may
    # match on them).
    return pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)


def _with_metadata(resp: pb.ProcessingResponse, value: str, scores: dict[str, float] | None = None) -> bytes:
    lb = resp.dynamic_metadata.fields[LB_NAMESPACE].struct_value
    lb.fields[DEST_HEADER].string_value = value
    if scores:
        fields = lb.fields[SCORES_KEY].struct_value.fields
        for address, score in scores.items():
            fields[address].number_value = score
    return _ser(resp)


def _metadata_string_list(msg: pb.ProcessingRequest, namespace: str, key: str) -> tuple[str, ...] | None:
    """A list of strings at ``namespace``/``key`` of the message's metadata context; None when
    absent or not a list (then, as the reference does, the whole pool is eligible)."""
    if not msg.HasField("metadata_context") or namespace not in msg.metadata_context.filter_metadata:
        return None
    fields = msg.metadata_context.filter_metadata[namespace].fields
    if key not in fields or fields[key].WhichOneof("kind") != "list_value":
        return None
    return tuple(v.string_value for v in fields[key].list_value.values if v.WhichOneof("kind") == "string_value")


def _metadata_string(msg: pb.ProcessingRequest, namespace: str, key: str) -> str:
    if not msg.HasField("metadata_context") or namespace not in msg.metadata_context.filter_metadata:
        return ""
    fields = msg.metadata_context.filter_metadata[namespace].fields
    return fields[key].string_value if key in fields else ""


def immediate(status: int, body: bytes, dropped: str | None = None,
              more: Sequence[tuple[str, str]] = ()) -> bytes:
    resp = pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(body=body, details=f"epp_{status}"))
    resp.immediate_response.status.code = status
    headers = [("content-type", b"application/json")]
    if dropped is not None:
        headers.append((DROPPED_REASON_HEADER, dropped.encode()))
    headers += [(k, v.encode()) for k, v in more]
    for key, value in headers:
        opt = resp.immediate_response.headers.set_headers.add()
        opt.header.key = key
        opt.header.raw_value = value
        opt.append_action = OVERWRITE
    return _ser(resp)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


@functools.lru_cache(maxsize=4096)  # (name, value) pairs repeat: limits, resets, session tokens
def _set_header(key: str, value: str) -> bytes:
    """HeaderMutation.set_headers(1) entry: HeaderValueOption{header(1){key(1), raw_value(3)},
    append_action(3) = OVERWRITE_IF_EXISTS_OR_ADD (2)}; an empty value is left out, as protobuf
    leaves out empty fields."""
    k = _field(b"\x0a", key.encode())
    hv = k + _field(b"\x1a", value.encode()) if value else k
    hv_len = _varint(len(hv))
    return b"".join((b"\x0a", _varint(1 + len(hv_len) + len(hv) + 2), b"\x0a", hv_len, hv, b"\x18\x02"))


def headers_response(headers: Sequence[tuple[str, str]], remove: Sequence[str] = ()) -> bytes:
    """The response_headers answer that sets ``headers`` (a plugin's session token, the rate
    limits of an API key, the decision headers of --decision-headers=true) and removes ``remove``,
    encoded directly (protobuf objects cost ~20 us here): ProcessingResponse.response_headers(2) >
    HeadersResponse.response(1) > CommonResponse.header_mutation(2) > set_headers(1) entries, then
    remove_headers(2)."""
    options = b"".join([_set_header(k, v) for k, v in headers] + [_field(b"\x12", n.encode()) for n in remove])
    return _field(b"\x12", _field(b"\x0a", _field(b"\x12", options)))


CONTINUE_REMOVING_SERVED = headers_response((), (SERVED_KEY,))


class OutOfOrder(Exception):
    """A message the protocol does not allow at this point: the stream ends with INVALID_ARGUMENT."""


class ExtProcStream:
    """One ext_proc stream. ``on_message`` returns the serialized responses to send, in order;
    it raises OutOfOrder for a message that cannot come now (a second request_headers)."""

    __slots__ = ("_after_pick", "_body_size", "_chunks", "_director", "_handed_over", "_headers", "_headers_seen",
                 "_held", "_held_response", "_observer", "_picked", "_req_mode", "_resp_mode", "_revoked", "_skipping",
                 "_subset", "_waiting", "decision_headers", "emit", "emit_scores", "max_body", "observed", "pick",
                 "skips")

    def __init__(self, director: PickService, decision_headers: bool = False, max_body: int = h2grpc.MAX_MESSAGE,
                 emit_scores: bool = False, skips: BodySkips | None = None,
                 observed: ObserverRegistry | None = None) -> None:
        self._director = director
        # --observed-responses: observer streams read the response (epp.server.observed); this
        # stream hands its pick over to them. (An observer filter that names no role in its
        # metadata comes here too: ``_observer`` reads every chunk then.)
        self.observed = observed
        self._handed_over = False
        self._observer: ObserverStream | None = None
        self.skips = skips  # set: the gateway allows mode overrides (skip bodies nothing reads)
        self._skipping = False  # asked to skip this response's body
        self.decision_headers = decision_headers
        self.emit_scores = emit_scores
        self._subset: tuple[str, ...] | None = None
        self.max_body = max_body
        self._body_size = 0
        self._headers_seen = False
        self.pick: RoutedSide | None = None
        self._req_mode = FULL_DUPLEX
        self._resp_mode = NONE
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._picked = False
        # Flow control may hold the pick: the answers then go out later through ``emit``, and
        # answers to messages that come meanwhile (trailers) wait in ``_held`` behind them.
        self._after_pick: Callable[[], list[bytes]] | None = None
        self._held: list[bytes] | None = None
        self._waiting: Pending | None = None
        self.emit: Callable[[list[bytes]], None] | None = None
        self._revoked = False  # flow control evicted the request: answered 429, the stream ends
        # A revocable request's response headers answer, held until its first body bytes (the
        # gateway keeps the response from the client until then: a revocation is a whole 429).
        self._held_response: bytes | None = None

    def on_message(self, msg: pb.ProcessingRequest) -> list[bytes]:
        if self._revoked:  # (messages the gateway sent before it saw the eviction's answer)
            return []
        kind = msg.WhichOneof("request")
        if msg.observability_mode:  # (the gateway waits for no answer)
            if self._observer is None:
                if self.observed is None:
                    return []
                self._observer = ObserverStream(self.observed, ALL)
            return self._observer.on_message(msg)
        if kind == "request_headers":
            if self._headers_seen or self._picked:  # a second pick would leak the first one's in-flight count
                raise OutOfOrder("request_headers after the request already started")
            self._headers_seen = True
            if msg.HasField("protocol_config"):
                req_mode = msg.protocol_config.request_body_mode
                resp_mode = msg.protocol_config.response_body_mode
                self._req_mode = req_mode if req_mode in KNOWN_MODES else STREAMED
                self._resp_mode = resp_mode if resp_mode in KNOWN_MODES else STREAMED
            self._headers = _headers(msg.request_headers)
            self._subset = _metadata_string_list(msg, SUBSET_NAMESPACE, SUBSET_KEY)
            if msg.request_headers.end_of_stream or self._req_mode in (NONE, STREAMED):
                self._picked = True
                # The body is known to be empty (the headers ended the stream, or said so), or
                # it goes by unseen (None): pick from the headers.
                empty = msg.request_headers.end_of_stream or self._headers.get("content-length", "").strip() == "0"
                return self._pick_in_headers(b"" if empty else None)
            if self._req_mode in (BUFFERED, BUFFERED_PARTIAL):
                return [CONTINUE_REQUEST_HEADERS]
            return []  # FULL_DUPLEX: hold the headers answer until the body is complete
        if kind == "request_body":
            body = msg.request_body
            if self._picked:
                if self._req_mode == FULL_DUPLEX:
                    # Envoy 1.35+ can re-deliver the final chunk after end_of_stream (envoy#46237):
                    # the body was already returned; answering again would be a spurious message.
                    return []
                return [CONTINUE_REQUEST_BODY]  # STREAMED chunks after a header pick
            if self._req_mode == FULL_DUPLEX:
                if body.body:
                    self._body_size += len(body.body)
                    if self._body_size > self.max_body:
                        self._picked = True
                        self._chunks = []
                        return [immediate(413, Refused(413, f"request body exceeds {self.max_body} bytes").body())]
                    self._chunks.append(body.body)
                if not body.end_of_stream:
                    return []
                return self._pick_full_duplex(eos=True)
            self._picked = True  # BUFFERED: one message with the whole body
            return self._pick_buffered(body.body)
        if kind == "request_trailers":
            out = self._pick_full_duplex(eos=False) if not self._picked and self._req_mode == FULL_DUPLEX else []
            if self._held is not None:
                self._held.append(CONTINUE_REQUEST_TRAILERS)
                return out
            out.append(CONTINUE_REQUEST_TRAILERS)
            return out
        if kind == "response_headers":
            pick = self.pick
            served_header = ""
            if pick is not None:
                pick.status, served_header = _status_and_served(msg.response_headers)
                served = _metadata_string(msg, LB_NAMESPACE, SERVED_KEY) or served_header
                if served:
                    pick.served_by(served)
                if msg.response_headers.end_of_stream:
                    pick.finish()
            headers = pick.response_headers(self.decision_headers) if pick is not None else ()
            remove = (SERVED_KEY,) if served_header else ()  # the gateway's own note: not for the client
            answer = headers_response(headers, remove) if headers else \
                CONTINUE_REMOVING_SERVED if remove else CONTINUE_RESPONSE_HEADERS
            skips = self.skips
            if (skips is not None and pick is not None and not pick.watch_response and not pick.done
                    and self._resp_mode in SKIPPABLE and self._req_mode != FULL_DUPLEX):
                self._skipping = True
                skips.ask()
                answer += SKIP_RESPONSE_BODY  # (two serialized messages concatenated parse as their merge)
            if (pick is not None and pick.revocable and not pick.done and self._resp_mode == FULL_DUPLEX
                    and self.observed is None):
                self._held_response = answer
                return []
            return [answer]
        if kind == "response_body":
            body = msg.response_body
            if self._skipping:  # the gateway did not honour the override
                self._skipping = False
                if self.skips is not None:
                    self.skips.ignored()
            eos = body.end_of_stream
            pick = self.pick
            data = pick.response_body(body.body, eos) if pick is not None and (eos or pick.wants_chunks) else body.body
            if self._resp_mode == FULL_DUPLEX:
                if eos:
                    out = [_streamed("response", data, True) if data else EMPTY_RESPONSE_EOS]
                elif data or pick is None or pick.reader is None:  # (only usage held back goes unanswered)
                    out = [_streamed("response", data, False)]
                else:
                    out = []
                if self._held_response is not None:  # (a revocable response's headers go first)
                    out.insert(0, self._held_response)
                    self._held_response = None
                return out
            return [CONTINUE_RESPONSE_BODY]
        if kind == "response_trailers":
            if self.pick is not None:
                self.pick.finish()
            held, self._held_response = self._held_response, None  # (trailers with no body before them)
            return [held, CONTINUE_RESPONSE_TRAILERS] if held is not None else [CONTINUE_RESPONSE_TRAILERS]
        return []

    @property
    def holding(self) -> bool:
        """A pick is held (flow control, or another process deciding): its answer is still to come."""
        return self._waiting is not None

    def close(self) -> None:
        """The stream ended (normally, reset, or the connection dropped)."""
        if self._observer is not None:
            self._observer.close()
        elif self.pick is not None:
            if self._handed_over:  # its observers end it
                self.pick.hand_over()
            else:
                self.pick.finish()
        elif self._waiting is not None:
            self._waiting.cancel()  # the client went away while flow control held the request
            self._waiting = None

    # -- picking ---------------------------------------------------------------------------------
    def _decide(self, body: bytes | None, answer: Callable[[], list[bytes]]) -> list[bytes]:
        """Pick into ``self.pick`` and return ``answer()``, or the ImmediateResponse of a refusal;
        when flow control holds the request, [] now and the same later through ``emit``."""
        headers = self._headers
        access = ResponseAccess.NONE
        if self.observed is not None:  # read off the data path: nothing can be cut out of the stream
            access = ResponseAccess.READ
        elif self._resp_mode == FULL_DUPLEX:  # epp sees the response body, and forwards the request
            access = ResponseAccess.INJECT if self._req_mode == FULL_DUPLEX else ResponseAccess.READ  # body itself
        try:
            out = self._director.submit(RequestInput(headers, headers.get(":path", ""), body, subset=self._subset),
                                        access, self._ready)
        except Refused as e:
            return [immediate(e.status, e.body(), e.dropped, e.headers)]
        if isinstance(out, Pending):
            self._waiting = out
            self._after_pick = answer
            self._held = []
            return []
        self._take(out)
        return answer()

    def _take(self, pick: RoutedSide) -> None:
        self.pick = pick
        if self.observed is None:  # (observed mode: this stream ends at the pick, its observers read on)
            pick.revoke = self._revoke

    def _revoke(self) -> None:
        """In-flight eviction: answer 429 with the drop reason; the stream then ends (``ended``),
        Envoy resets the request upstream, and the pick finishes with the stream."""
        pick = self.pick
        if pick is None or pick.done or self._revoked:
            return
        self._revoked = True
        pick.status = 429
        refusal = Refused(429, "flow control: evicted to make room for higher-priority requests; retry later",
                          dropped=EVICTED)
        if self.emit is not None:
            self.emit([immediate(refusal.status, refusal.body(), refusal.dropped)])

    def _ready(self, result: RoutedSide | Refused) -> None:
        """Flow control dispatched (or refused) the held request: send what was held back."""
        self._waiting = None
        answer, held = self._after_pick, self._held or []
        self._after_pick = self._held = None
        if isinstance(result, Refused):
            out = [immediate(result.status, result.body(), result.dropped, result.headers)]
        else:
            self._take(result)
            out = answer() if answer is not None else []
            out.extend(held)
        if self.emit is not None:
            self.emit(out)

    def _request_id(self) -> str | None:
        return None if "x-request-id" in self._headers else uuid.uuid4().hex

    def _pick_in_headers(self, body: bytes | None) -> list[bytes]:
        """Pick; the answer is the HeadersResponse (or an ImmediateResponse)."""
        return self._decide(body, lambda: [self._pick_response("request_headers")])

    def _pick_buffered(self, body: bytes) -> list[bytes]:
        """Pick; the answer is the BodyResponse (BUFFERED mode)."""
        return self._decide(body, lambda: [self._pick_response("request_body", self._routed().forward_body)])

    def _routed(self) -> RoutedSide:
        assert self.pick is not None
        return self.pick

    def _pick_response(self, phase: str, new_body: bytes | None = None) -> bytes:
        assert self.pick is not None
        value = self.pick.header_value
        extra = self.pick.request_headers
        if self.observed is not None and not self._handed_over:
            self._handed_over = True
            extra = (*extra, (PICK_TOKEN_HEADER, self.observed.register(self.pick)))
        common = _pick_mutation(value, self._request_id(), extra, self.pick.removed_headers)
        if new_body is not None:  # BUFFERED: the whole body replaced, its length with it
            common.body_mutation.body = new_body
            opt = common.header_mutation.set_headers.add()
            opt.header.key = "content-length"
            opt.header.raw_value = str(len(new_body)).encode()
            opt.append_action = OVERWRITE
        if phase == "request_headers":
            resp = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        else:
            resp = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
        return _with_metadata(resp, value, self.pick.endpoint_scores() if self.emit_scores else None)

    @property
    def ended(self) -> bool:
        """epp may end the stream now (an observer's, whose reading is done; an evicted request's)."""
        return self._revoked or (self._observer is not None and self._observer.ended)

    def _pick_full_duplex(self, eos: bool) -> list[bytes]:
        self._picked = True
        chunks = self._chunks
        self._chunks = []
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)

        def answer() -> list[bytes]:
            pick = self._routed()
            out = [self._pick_response("request_headers")]
            sent = pick.forward_body if pick.forward_body is not None else body
            # (Envoy forwards FULL_DUPLEX bodies chunked: no Content-Length to fix.)
            n = len(sent)
            if n == 0:
                if eos:
                    out.append(EMPTY_REQUEST_EOS)
                return out
            for start in range(0, n, PIECE):
                out.append(_streamed("request", sent[start : start + PIECE], eos and start + PIECE >= n))
            return out

        return self._decide(body, answer)


StreamFactory = Callable[[], ExtProcStream]


class H2ExtProc:
    """Adapts ExtProcStream (or an ObserverStream) to the HTTP/2 server's handler interface. When
    the stream says it has ``ended`` (an observer's reading is done), epp ends it: Envoy then
    sends no more of it, and does not hold it open for its deferred_close_timeout."""

    __slots__ = ("ending", "responder", "stream")

    def __init__(self, responder: h2grpc.Responder, stream: ExtProcStream | ObserverStream) -> None:
        self.responder = responder
        self.stream = stream
        self.ending = False  # the gateway half-closed while the pick was held
        stream.emit = self._emit

    def _emit(self, answers: list[bytes]) -> None:
        """Answers produced outside this stream's read (a pick flow control or the state process
        released)."""
        send = self.responder.send
        for out in answers:
            send(out)
        if self.ending or self.stream.ended:
            self.stream.close()
            self.responder.finish()
        self.responder.flush()

    def on_message(self, message: bytes) -> None:
        try:
            msg = pb.ProcessingRequest.FromString(message)
        except DecodeError:
            self.responder.finish(h2grpc.INVALID_ARGUMENT, "cannot parse ProcessingRequest")
            self.stream.close()
            return
        try:
            answers = self.stream.on_message(msg)
        except OutOfOrder as e:
            self.responder.finish(h2grpc.INVALID_ARGUMENT, str(e))
            self.stream.close()
            return
        send = self.responder.send
        for out in answers:
            send(out)
        if self.stream.ended:
            self.responder.finish()

    def on_end(self) -> None:
        """The gateway half-closed: a pick still held is answered first, then the stream ends."""
        if self.stream.holding:
            self.ending = True
            return
        self.stream.close()
        self.responder.finish()

    def on_reset(self) -> None:
        self.stream.close()


def h2_services(new_stream: StreamFactory, observed: ObserverRegistry | None = None
                ) -> dict[str, h2grpc.HandlerFactory]:
    """The Process method; with ``observed``, a stream whose gRPC metadata names an observer role
    (--observed-responses) is an ObserverStream."""
    def handler(responder: h2grpc.Responder, headers: dict[str, str]) -> H2ExtProc:
        role = headers.get(ROLE_HEADER) if observed is not None else None
        if observed is not None and role in (FIRST, END, ALL):
            return H2ExtProc(responder, ObserverStream(observed, role))
        return H2ExtProc(responder, new_stream())
    return {METHOD_PATH: handler}
