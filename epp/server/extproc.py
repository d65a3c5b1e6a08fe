"""Envoy ext_proc (envoy.service.ext_proc.v3.ExternalProcessor/Process), one stream per request.

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
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.request import GENERATION_PATHS, RequestError, headers_only, parse_body
from epp.scheduling.types import SchedulingError
from epp.server.picking import Pick, PickService

log = logging.getLogger("epp.extproc")

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
DEST_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
PIECE = 62_000  # bytes per streamed_response piece (as the reference)

NONE = processing_mode_pb2.ProcessingMode.NONE
STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
BUFFERED_PARTIAL = processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# Constant answers, serialised once.
CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse()).SerializeToString()
CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse()).SerializeToString()
CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse()).SerializeToString()
CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse()).SerializeToString()
CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse()).SerializeToString()
CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse()).SerializeToString()
EMPTY_RESPONSE_EOS = pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
    body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=b"", end_of_stream=True)))))
EMPTY_RESPONSE_EOS_BYTES = EMPTY_RESPONSE_EOS.SerializeToString()


def _headers(msg: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _common_with_pick(value: str, request_id: str | None) -> pb.CommonResponse:
    mutation = pb.HeaderMutation()
    opt = mutation.set_headers.add()
    opt.header.key = DEST_HEADER
    opt.header.raw_value = value.encode()
    opt.append_action = OVERWRITE
    if request_id is not None:
        opt = mutation.set_headers.add()
        opt.header.key = "x-request-id"
        opt.header.raw_value = request_id.encode()
        opt.append_action = OVERWRITE
    return pb.CommonResponse(header_mutation=mutation)


def _with_metadata(resp: pb.ProcessingResponse, value: str) -> pb.ProcessingResponse:
    resp.dynamic_metadata.fields[LB_NAMESPACE].struct_value.fields[DEST_HEADER].string_value = value
    return resp


def immediate(status: int, body: bytes) -> bytes:
    resp = pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(body=body, details=f"epp_{status}"))
    resp.immediate_response.status.code = status
    opt = resp.immediate_response.headers.set_headers.add()
    opt.header.key = "content-type"
    opt.header.raw_value = b"application/json"
    opt.append_action = OVERWRITE
    out: bytes = resp.SerializeToString()
    return out


def explain_response(pick: Pick) -> bytes:
    """Response headers naming the pick and why (opt-in: --decision-headers=true)."""
    mutation = pb.HeaderMutation()
    for key, value in (("x-epp-endpoint", pick.header_value), ("x-epp-reason", pick.decision.reason())):
        opt = mutation.set_headers.add()
        opt.header.key = key
        opt.header.raw_value = value.encode()
        opt.append_action = OVERWRITE
    out: bytes = pb.ProcessingResponse(response_headers=pb.HeadersResponse(
        response=pb.CommonResponse(header_mutation=mutation))).SerializeToString()
    return out


def _error_body(status: int, message: str) -> bytes:
    return RequestError(status, message, "ServiceUnavailableError" if status == 503 else
                        "RateLimitError" if status == 429 else "BadRequestError").body()


class ExtProcServicer:
    """One instance serves all streams; per-request state lives in the coroutine."""

    def __init__(self, picks: PickService, decision_headers: bool = False) -> None:
        self.picks = picks
        self.decision_headers = decision_headers

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self.process, request_deserializer=pb.ProcessingRequest.FromString,
            response_serializer=lambda b: b)
        return grpc.method_handlers_generic_handler(SERVICE, {"Process": method})

    async def process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        read, write = context.read, context.write
        pick: Pick | None = None
        req_mode = FULL_DUPLEX
        resp_mode = NONE
        headers: dict[str, str] = {}
        chunks: list[bytes] = []
        picked = False
        try:
            while True:
                msg = await read()
                if msg is grpc.aio.EOF:
                    return
                kind = msg.WhichOneof("request")
                if kind == "request_headers":
                    if msg.HasField("protocol_config"):
                        req_mode = msg.protocol_config.request_body_mode
                        resp_mode = msg.protocol_config.response_body_mode
                    headers = _headers(msg.request_headers)
                    if msg.request_headers.end_of_stream or req_mode in (NONE, STREAMED):
                        out, pick = self._pick_headers_only(headers, msg.request_headers.end_of_stream)
                        picked = True
                        await write(out)
                    elif req_mode in (BUFFERED, BUFFERED_PARTIAL):
                        await write(CONTINUE_REQUEST_HEADERS)
                elif kind == "request_body":
                    body = msg.request_body
                    if picked:
                        await write(CONTINUE_REQUEST_BODY)  # STREAMED chunks after a header pick
                        continue
                    if req_mode == FULL_DUPLEX:
                        if body.body:
                            chunks.append(body.body)
                        if body.end_of_stream:
                            picked = True
                            pick = await self._pick_full_duplex(write, headers, chunks, eos=True)
                            chunks = []
                    else:  # BUFFERED / BUFFERED_PARTIAL: one message with the whole body
                        picked = True
                        out, pick = self._pick_buffered(headers, body.body)
                        await write(out)
                elif kind == "request_trailers":
                    if not picked and req_mode == FULL_DUPLEX:
                        picked = True
                        pick = await self._pick_full_duplex(write, headers, chunks, eos=False)
                        chunks = []
                    await write(CONTINUE_REQUEST_TRAILERS)
                elif kind == "response_headers":
                    if self.decision_headers and pick is not None:
                        await write(explain_response(pick))
                    else:
                        await write(CONTINUE_RESPONSE_HEADERS)
                    if msg.response_headers.end_of_stream and pick is not None:
                        pick.finish()
                elif kind == "response_body":
                    body = msg.response_body
                    if resp_mode == FULL_DUPLEX:
                        if not body.body and body.end_of_stream:
                            await write(EMPTY_RESPONSE_EOS_BYTES)
                        else:
                            await write(pb.ProcessingResponse(response_body=pb.BodyResponse(
                                response=pb.CommonResponse(body_mutation=pb.BodyMutation(
                                    streamed_response=pb.StreamedBodyResponse(
                                        body=body.body, end_of_stream=body.end_of_stream))))).SerializeToString())
                    else:
                        await write(CONTINUE_RESPONSE_BODY)
                    if body.end_of_stream and pick is not None:
                        pick.finish()
                elif kind == "response_trailers":
                    await write(CONTINUE_RESPONSE_TRAILERS)
                    if pick is not None:
                        pick.finish()
        finally:
            if pick is not None:
                pick.finish()

    # -- picking ---------------------------------------------------------------------------------
    def _decide(self, headers: dict[str, str], body: bytes | None) -> tuple[Pick | None, bytes | None]:
        """(pick, None) or (None, serialized ImmediateResponse)."""
        request_id = headers.get("x-request-id") or ""
        path = headers.get(":path", "")
        try:
            if body is None or not path.startswith(GENERATION_PATHS):
                req = headers_only(request_id, path, headers)
            else:
                req = parse_body(request_id, path, headers, body)
        except RequestError as e:
            self.picks.metrics.errors.labels("", "", str(e.status)).inc()
            return None, immediate(e.status, e.body())
        try:
            return self.picks.pick(req), None
        except SchedulingError as e:
            self.picks.refused(req, e.status)
            log.warning("request %s refused: %d %s", request_id or "-", e.status, e.message)
            return None, immediate(e.status, _error_body(e.status, e.message))

    def _pick_headers_only(self, headers: dict[str, str], no_body: bool) -> tuple[bytes, Pick | None]:
        pick, error = self._decide(headers, None)
        if pick is None:
            assert error is not None
            return error, None
        rid = None if "x-request-id" in headers else uuid.uuid4().hex
        resp = _with_metadata(pb.ProcessingResponse(request_headers=pb.HeadersResponse(
            response=_common_with_pick(pick.header_value, rid))), pick.header_value)
        return resp.SerializeToString(), pick

    def _pick_buffered(self, headers: dict[str, str], body: bytes) -> tuple[bytes, Pick | None]:
        pick, error = self._decide(headers, body)
        if pick is None:
            assert error is not None
            return error, None
        rid = None if "x-request-id" in headers else uuid.uuid4().hex
        resp = _with_metadata(pb.ProcessingResponse(request_body=pb.BodyResponse(
            response=_common_with_pick(pick.header_value, rid))), pick.header_value)
        return resp.SerializeToString(), pick

    async def _pick_full_duplex(self, write: Any, headers: dict[str, str], chunks: list[bytes],
                                eos: bool) -> Pick | None:
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        pick, error = self._decide(headers, body)
        if pick is None:
            assert error is not None
            await write(error)
            return None
        rid = None if "x-request-id" in headers else uuid.uuid4().hex
        resp = _with_metadata(pb.ProcessingResponse(request_headers=pb.HeadersResponse(
            response=_common_with_pick(pick.header_value, rid))), pick.header_value)
        await write(resp.SerializeToString())
        n = len(body)
        if n == 0:
            if eos:
                await write(pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
                    body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
                        body=b"", end_of_stream=True))))).SerializeToString())
            return pick
        for start in range(0, n, PIECE):
            last = start + PIECE >= n
            await write(pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
                    body=body[start : start + PIECE], end_of_stream=eos and last))))).SerializeToString())
        return pick
