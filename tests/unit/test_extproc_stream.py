"""The ext_proc state machine, driven directly (no network), and its hand-encoded messages."""

from __future__ import annotations

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client import CollectorRegistry

from epp.config import load_config, parse_config
from epp.datastore.endpoint import EngineSignals
from epp.datastore.store import Datastore
from epp.observability.metrics import PickerMetrics
from epp.requestcontrol.director import Director
from epp.requestcontrol.frontend import Ready, RoutedSide
from epp.requestcontrol.pending import Pending
from epp.requestcontrol.routed import RequestInput, ResponseAccess
from epp.server.extproc import ExtProcStream, H2ExtProc, ResponseBodySkips, _streamed
from epp.server.observed import ALL, END, FIRST, PICK_TOKEN_HEADER, ObservedPicks, ObserverStream

BODY = orjson.dumps({"model": "m", "prompt": "hello world " * 10})
FULL_DUPLEX, BUFFERED, STREAMED, NONE_MODE = 4, 2, 1, 0


def service(n: int = 2) -> Director:
    store = Datastore()
    addrs = [f"10.0.0.{i}:8000" for i in range(n)]
    store.set_endpoints(addrs)
    for a in addrs:
        store.record_scrape(a, EngineSignals(), 0)
    scheduler, _ = load_config(None).build()
    return Director(store, scheduler, PickerMetrics(store))


def headers(mode: int, eos: bool = False, path: str = "/v1/completions", resp_mode: int = FULL_DUPLEX,
            request_id: bool = True) -> pb.ProcessingRequest:
    h = pb.HttpHeaders(end_of_stream=eos)
    for k, v in ((":path", path), (":method", "POST"), ("content-type", "application/json")):
        h.headers.headers.add(key=k, raw_value=v.encode())
    if request_id:
        h.headers.headers.add(key="x-request-id", raw_value=b"rid-1")
    msg = pb.ProcessingRequest(request_headers=h)
    msg.protocol_config.request_body_mode = mode
    msg.protocol_config.response_body_mode = resp_mode
    return msg


def body(data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def parse(out: list[bytes]) -> list[pb.ProcessingResponse]:
    return [pb.ProcessingResponse.FromString(b) for b in out]


def dest(resp: pb.ProcessingResponse, phase: str) -> str:
    common = getattr(resp, phase).response
    values = {o.header.key: o.header.raw_value.decode() for o in common.header_mutation.set_headers}
    meta = resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"]
    assert meta.string_value == values["x-gateway-destination-endpoint"]
    return values["x-gateway-destination-endpoint"]


def test_full_duplex_holds_headers_then_returns_body_pieces_with_one_eos() -> None:
    ps = service()
    s = ExtProcStream(ps)
    assert s.on_message(headers(FULL_DUPLEX)) == []
    assert s.on_message(body(BODY[:50], False)) == []
    out = parse(s.on_message(body(BODY[50:], False)) + s.on_message(body(b"", True)))
    assert out[0].WhichOneof("response") == "request_headers"
    assert dest(out[0], "request_headers") in ps.store.addresses()
    assert out[0].request_headers.response.clear_route_cache  # as the reference: the route is re-evaluated
    pieces = [r.request_body.response.body_mutation.streamed_response for r in out[1:]]
    assert b"".join(p.body for p in pieces) == BODY
    assert [p.end_of_stream for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert sum(ps.store.inflight.values()) == 1
    # Envoy 1.35+ may re-deliver the last chunk after end_of_stream: it is ignored, not re-picked.
    assert s.on_message(body(b"", True)) == [] and s.on_message(body(BODY[-5:], True)) == []
    assert sum(ps.store.inflight.values()) == 1
    # Response phases: headers continue, body passed through byte for byte, end releases in-flight.
    assert parse(s.on_message(pb.ProcessingRequest(response_headers=pb.HttpHeaders())))[0].HasField(
        "response_headers")
    chunk = b'data: {"choices":[]}\n\n'
    r = parse(s.on_message(pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk))))[0]
    assert r.response_body.response.body_mutation.streamed_response.body == chunk
    r = parse(s.on_message(pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True))))[0]
    assert r.response_body.response.body_mutation.streamed_response.end_of_stream
    assert sum(ps.store.inflight.values()) == 0


def test_large_body_is_cut_into_pieces() -> None:
    s = ExtProcStream(service())
    big = orjson.dumps({"model": "m", "prompt": "x" * 200_000})
    s.on_message(headers(FULL_DUPLEX))
    out = parse(s.on_message(body(big, True)))
    pieces = [r.request_body.response.body_mutation.streamed_response for r in out[1:]]
    assert len(pieces) == 4 and all(len(p.body) <= 62_000 for p in pieces)
    assert b"".join(p.body for p in pieces) == big and pieces[-1].end_of_stream


def test_request_trailers_end_the_body_in_full_duplex() -> None:
    s = ExtProcStream(service())
    s.on_message(headers(FULL_DUPLEX))
    s.on_message(body(BODY, False))
    out = parse(s.on_message(pb.ProcessingRequest(request_trailers=pb.HttpTrailers())))
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "request_trailers"]
    assert not out[1].request_body.response.body_mutation.streamed_response.end_of_stream


def test_buffered_picks_on_the_body_response_and_leaves_the_body_alone() -> None:
    s = ExtProcStream(service())
    first = parse(s.on_message(headers(BUFFERED, resp_mode=0)))
    assert first[0].request_headers == pb.HeadersResponse()
    out = parse(s.on_message(body(BODY, True)))[0]
    assert dest(out, "request_body") and out.request_body.response.clear_route_cache
    assert not out.request_body.response.HasField("body_mutation")
    assert parse(s.on_message(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x", end_of_stream=True))))[
        0].response_body == pb.BodyResponse()


def test_headers_only_requests_and_streamed_mode_pick_from_headers() -> None:
    s = ExtProcStream(service())
    out = parse(s.on_message(headers(FULL_DUPLEX, eos=True, path="/v1/models", request_id=False)))[0]
    values = {o.header.key for o in out.request_headers.response.header_mutation.set_headers}
    assert values == {"x-gateway-destination-endpoint", "x-request-id"}  # an id is generated when missing
    s = ExtProcStream(service())
    out = parse(s.on_message(headers(STREAMED)))[0]
    assert dest(out, "request_headers")
    assert parse(s.on_message(body(b"chunk", False)))[0].request_body == pb.BodyResponse()


def test_errors_are_immediate_responses_and_release_nothing() -> None:
    ps = service()
    s = ExtProcStream(ps)
    s.on_message(headers(FULL_DUPLEX))
    out = parse(s.on_message(body(b"{nope", True)))[0]
    assert out.immediate_response.status.code == 400
    assert orjson.loads(out.immediate_response.body)["error"]["code"] == 400
    empty = ExtProcStream(Director(Datastore(), ps.scheduler, ps.metrics))
    empty.on_message(headers(FULL_DUPLEX))
    out = parse(empty.on_message(body(BODY, True)))[0]
    assert out.immediate_response.status.code == 503


def test_a_dropped_stream_releases_its_pick() -> None:
    ps = service()
    s = ExtProcStream(ps)
    s.on_message(headers(FULL_DUPLEX))
    s.on_message(body(BODY, True))
    assert sum(ps.store.inflight.values()) == 1
    s.close()
    s.close()
    assert sum(ps.store.inflight.values()) == 0


def test_hand_encoded_streamed_bodies_decode_exactly_like_upb_builds_them() -> None:
    for phase in ("request", "response"):
        for data in (b"", b"x", b"y" * 200, b"z" * 70_000):
            for eos in (False, True):
                common = pb.CommonResponse(body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=data, end_of_stream=eos)))
                if phase == "request":
                    want = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
                else:
                    want = pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))
                assert _streamed(phase, data, eos) == want.SerializeToString()


def immediate_status(out: list[bytes]) -> int | None:
    resp = parse(out)[-1]
    return resp.immediate_response.status.code if resp.HasField("immediate_response") else None


def with_header(msg: pb.ProcessingRequest, key: str, value: str) -> pb.ProcessingRequest:
    msg.request_headers.headers.headers.add(key=key, raw_value=value.encode())
    return msg


def test_unknown_body_modes_still_get_an_answer_to_every_message() -> None:
    for mode in (5, 6, 42):
        ps = service()
        s = ExtProcStream(ps)
        out = parse(s.on_message(headers(mode, resp_mode=mode)))
        assert len(out) == 1 and out[0].HasField("request_headers")  # picked from the headers
        assert dest(out[0], "request_headers") in ps.store.addresses()
        assert parse(s.on_message(body(BODY, True)))[0].HasField("request_body")
        assert parse(s.on_message(pb.ProcessingRequest(response_headers=pb.HttpHeaders())))[0].HasField(
            "response_headers")
        assert parse(s.on_message(pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True))))[0].HasField(
            "response_body")
        assert sum(ps.store.inflight.values()) == 0


def test_an_empty_generation_body_is_refused_in_every_mode() -> None:
    for mode in (FULL_DUPLEX, BUFFERED, STREAMED, 0):
        s = ExtProcStream(service())
        assert immediate_status(s.on_message(headers(mode, eos=True))) == 400  # Content-Length: 0 ends the stream
        s = ExtProcStream(service())
        first = s.on_message(with_header(headers(mode), "content-length", "0"))
        if mode in (STREAMED, 0):
            assert immediate_status(first) == 400
        else:
            assert immediate_status(first + s.on_message(body(b"", True))) == 400


def test_a_get_without_a_body_is_still_routed() -> None:
    s = ExtProcStream(service())
    msg = headers(FULL_DUPLEX, eos=True, path="/v1/models")
    msg.request_headers.headers.headers[1].raw_value = b"GET"
    (resp,) = parse(s.on_message(msg))
    assert resp.HasField("request_headers") and dest(resp, "request_headers")


def test_odd_paths_are_parsed_like_the_plain_ones() -> None:
    bad = orjson.dumps({"model": "m", "messages": 42})
    for path in ("/V1/Chat/Completions", "//v1/chat/completions", "/v1//chat/completions?x=1"):
        s = ExtProcStream(service())
        s.on_message(headers(BUFFERED, path=path))
        assert immediate_status(s.on_message(body(bad, True))) == 400, path


def test_messages_and_prompt_of_the_wrong_shape_are_refused() -> None:
    for path, payload in (("/v1/chat/completions", {"model": "m", "messages": 42}),
                          ("/v1/chat/completions", {"model": "m", "messages": ["hi"]}),
                          ("/v1/chat/completions", {"model": "m"}),
                          ("/v1/completions", {"model": "m", "prompt": 42}),
                          ("/v1/completions", {"model": "m"})):
        s = ExtProcStream(service())
        s.on_message(headers(BUFFERED, path=path))
        out = s.on_message(body(orjson.dumps(payload), True))
        assert immediate_status(out) == 400, (path, payload)
        err = orjson.loads(parse(out)[0].immediate_response.body)["error"]
        assert err["code"] == 400 and err["param"] in ("messages", "prompt")


def test_a_full_duplex_body_past_the_limit_gets_413_and_is_not_held() -> None:
    ps = service()
    s = ExtProcStream(ps, max_body=1000)
    s.on_message(headers(FULL_DUPLEX))
    assert s.on_message(body(b"x" * 600, False)) == []
    assert immediate_status(s.on_message(body(b"x" * 600, False))) == 413
    assert s.on_message(body(b"x" * 600, True)) == [] and not s._chunks
    assert sum(ps.store.inflight.values()) == 0


def test_headers_response_is_the_protobuf_encoding() -> None:
    """The hand-encoded response_headers answer is byte for byte what protobuf would write."""
    from envoy.config.core.v3 import base_pb2

    from epp.server.extproc import headers_response

    cases = ([], [("x-a", "1")], [("x-ratelimit-reset-tokens", "1m30s"), ("set-cookie", "v" * 300)],
             [("x-é", "ü" * 70), ("k" * 200, "")])
    for headers, remove in [(h, ()) for h in cases] + [(h, ("x-gateway-destination-endpoint-served",)) for h in cases]:
        mutation = pb.HeaderMutation()
        mutation.remove_headers.extend(remove)
        for key, value in headers:
            opt = mutation.set_headers.add()
            opt.header.key = key
            opt.header.raw_value = value.encode()
            opt.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        expected = pb.ProcessingResponse(response_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation))).SerializeToString()
        assert headers_response(headers, remove) == expected, headers


def _response_headers() -> pb.ProcessingRequest:
    h = pb.HttpHeaders()
    h.headers.headers.add(key=":status", raw_value=b"200")
    return pb.ProcessingRequest(response_headers=h)


def _skip_asked(director: Director, req_mode: int, resp_mode: int, allowed: bool = True) -> bool:
    """Whether the response headers answer asks Envoy to skip the body (checked as Envoy reads it)."""
    registry = CollectorRegistry()
    skips = ResponseBodySkips(registry) if allowed else None
    s = ExtProcStream(director, skips=skips)
    s.on_message(headers(req_mode, resp_mode=resp_mode))
    if req_mode != STREAMED:
        s.on_message(body(BODY, True))
    [answer] = parse(s.on_message(_response_headers()))
    assert answer.HasField("response_headers")  # the headers answer itself is intact
    if not answer.HasField("mode_override"):
        return False
    mode = answer.mode_override
    assert (mode.response_body_mode, mode.response_trailer_mode) == (0, 2)  # NONE, SKIP
    assert registry.get_sample_value("epp_response_body_skips_total", {"outcome": "asked"}) == 1
    return True


def test_the_body_skip_is_asked_only_when_allowed_honoured_and_unread() -> None:
    plain = service()
    assert _skip_asked(plain, BUFFERED, STREAMED)
    assert _skip_asked(plain, STREAMED, BUFFERED)
    assert not _skip_asked(plain, BUFFERED, STREAMED, allowed=False)  # the gateway does not allow it
    assert not _skip_asked(plain, BUFFERED, 0)  # no body is sent anyway
    assert not _skip_asked(plain, FULL_DUPLEX, STREAMED)  # Envoy ignores overrides in FULL_DUPLEX_STREAMED
    assert not _skip_asked(plain, FULL_DUPLEX, FULL_DUPLEX)  # epp reads (and must echo) the body
    # A plugin that reads pending prefill tokens needs each response's first bytes.
    cfg = parse_config("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-load-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: token-load-scorer
  - pluginRef: max-score-picker
""", "config")
    scheduler, _ = cfg.build()
    assert scheduler.watches_first_bytes and not plain.scheduler.watches_first_bytes
    tokens = Director(plain.store, scheduler, plain.metrics)
    assert not _skip_asked(tokens, BUFFERED, STREAMED)


def test_a_gateway_that_ignores_the_skip_is_counted_and_the_body_still_served() -> None:
    ps = service()
    registry = CollectorRegistry()
    skips = ResponseBodySkips(registry)
    s = ExtProcStream(ps, skips=skips)
    s.on_message(headers(BUFFERED, resp_mode=STREAMED))
    s.on_message(body(BODY, True))
    assert parse(s.on_message(_response_headers()))[0].HasField("mode_override")
    for last in (False, False, True):
        out = parse(s.on_message(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: x\n\n",
                                                                                 end_of_stream=last))))
        assert out[0].response_body == pb.BodyResponse()
    assert skips.warned  # (logged once per process)
    assert registry.get_sample_value("epp_response_body_skips_total", {"outcome": "ignored"}) == 1  # once per stream
    assert sum(ps.store.inflight.values()) == 0  # ended by the body's end, as without the ask


def test_a_skipped_body_ends_with_the_stream() -> None:
    ps = service()
    s = ExtProcStream(ps, skips=ResponseBodySkips(CollectorRegistry()))
    s.on_message(headers(BUFFERED, resp_mode=STREAMED))
    s.on_message(body(BODY, True))
    s.on_message(_response_headers())
    assert sum(ps.store.inflight.values()) == 1  # still in flight while the response streams
    s.close()  # Envoy ends the ext_proc stream when the response ends
    assert sum(ps.store.inflight.values()) == 0


class _Holding:
    """A pick service that holds every request until told (as flow control or the state process
    of ``--workers`` does), then asks the real director."""

    class Held(Pending):
        __slots__ = ("cancelled",)

        def cancel(self) -> None:
            self.cancelled = True

    def __init__(self, director: Director) -> None:
        self.director = director
        self.held: list[tuple[_Holding.Held, RequestInput, ResponseAccess]] = []

    def submit(self, given: RequestInput, access: ResponseAccess = ResponseAccess.NONE,
               ready: Ready | None = None) -> RoutedSide | Pending:
        p = _Holding.Held(None)  # type: ignore[arg-type]
        p.ready, p.cancelled = ready, False  # type: ignore[assignment]
        self.held.append((p, given, access))
        return p

    def release(self) -> None:
        p, given, access = self.held.pop(0)
        out = self.director.submit(given, access)
        assert not isinstance(out, Pending)
        p.deliver(out)  # type: ignore[arg-type]


class _Recorder:
    peer = "127.0.0.1"

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.finished: list[int] = []
        self.flushes = 0

    def send(self, message: bytes) -> None:
        self.sent.append(message)

    def finish(self, status: int = 0, message: str = "") -> None:
        self.finished.append(status)

    def flush(self) -> None:
        self.flushes += 1


def test_a_half_close_while_the_pick_is_held_answers_first_then_ends() -> None:
    director = service()
    holding = _Holding(director)
    responder = _Recorder()
    handler = H2ExtProc(responder, ExtProcStream(holding))
    handler.on_message(headers(BUFFERED, resp_mode=0).SerializeToString())
    handler.on_message(body(BODY, True).SerializeToString())
    handler.on_end()  # the client half-closes before the pick is back
    assert responder.finished == [] and len(responder.sent) == 1  # only the headers' CONTINUE so far
    holding.release()
    (answer,) = parse(responder.sent[1:])
    assert dest(answer, "request_body") in director.store.inflight
    assert responder.finished == [0]
    assert sum(director.store.inflight.values()) == 0  # the stream ended: the pick released


def test_a_reset_while_the_pick_is_held_cancels_it() -> None:
    holding = _Holding(service())
    responder = _Recorder()
    handler = H2ExtProc(responder, ExtProcStream(holding))
    handler.on_message(headers(BUFFERED, resp_mode=0).SerializeToString())
    handler.on_message(body(BODY, True).SerializeToString())
    handler.on_end()
    handler.on_reset()
    assert holding.held[0][0].cancelled and responder.finished == []


# -- observed responses (--observed-responses): the pick hands over, the observers read ----------------
def _observed_pick(ps: Director, observed: ObservedPicks) -> tuple[ExtProcStream, str]:
    """A full-duplex pick with an observer registry: the stream and the token its answer carries."""
    pick = ExtProcStream(ps, observed=observed)
    pick.on_message(headers(FULL_DUPLEX, resp_mode=NONE_MODE))
    out = parse(pick.on_message(body(BODY, True)))
    values = {o.header.key: o.header.raw_value.decode()
              for o in out[0].request_headers.response.header_mutation.set_headers}
    return pick, values[PICK_TOKEN_HEADER]


def _observer(ps: Director, observed: ObservedPicks, role: str, token: str) -> ExtProcStream | ObserverStream:
    """An observer stream of ``role`` (named in its gRPC metadata), or one that names none (``all``:
    the pick stream's class takes it)."""
    s: ExtProcStream | ObserverStream = ObserverStream(observed, role) if role != ALL else \
        ExtProcStream(ps, observed=observed)
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(), observability_mode=True)
    msg.request_headers.headers.headers.add(key=PICK_TOKEN_HEADER, raw_value=token.encode())
    assert s.on_message(msg) == []
    return s


def _chunk(data: bytes, eos: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos), observability_mode=True)


def test_a_handed_over_pick_outlives_its_stream_and_ends_with_the_end_observer() -> None:
    ps, observed = service(), ObservedPicks(None, usage_sample=0.0)
    pick, token = _observed_pick(ps, observed)
    pick.close()  # the gateway is done with the pick filter at the response headers
    assert sum(ps.store.inflight.values()) == 1
    first, end = _observer(ps, observed, FIRST, token), _observer(ps, observed, END, token)
    assert first.on_message(_chunk(b"data: 1\n\n")) == []
    assert first.ended  # its first bytes read: epp ends that stream, Envoy sends no more
    first.close()
    assert sum(ps.store.inflight.values()) == 1  # the end is the end observer's to tell
    end.close()
    assert sum(ps.store.inflight.values()) == 0
    assert len(observed) == 0


def test_an_observer_reading_everything_ends_the_request_at_the_last_chunk() -> None:
    ps, observed = service(), ObservedPicks(None)
    pick, token = _observed_pick(ps, observed)
    pick.close()
    every = _observer(ps, observed, ALL, token)
    for i in range(3):
        every.on_message(_chunk(b"data: %d\n\n" % i))
        assert not every.ended
    every.on_message(_chunk(b"data: [DONE]\n\n", eos=True))
    assert every.ended and sum(ps.store.inflight.values()) == 0


def test_observer_messages_get_no_answer_and_a_stray_token_claims_nothing() -> None:
    ps, observed = service(), ObservedPicks(None)
    stray = _observer(ps, observed, FIRST, "not-a-token")
    assert stray.on_message(_chunk(b"data: 1\n\n", eos=True)) == []
    stray.close()
    assert sum(ps.store.inflight.values()) == 0
