"""A cheap ext_proc load generator: picks/s at saturation without a gateway in the way.

Each stream is what Envoy sends in BUFFERED mode with response processing off: the request
headers and the whole body, then the end of the stream. The frames are built once (HPACK
literals, no dynamic table) and only the stream id changes, so the client spends a few
microseconds per pick and the picker is what saturates. A stream counts as picked when the
picker's answer names a destination; anything else (an immediate response, a reset) is an error.

With TOKENS, each stream is gateway mode instead (FULL_DUPLEX_STREAMED both ways): once the pick's
answer is in, the pod's response follows through the picker, its headers and TOKENS SSE chunks.

With ``observed`` (``epp serve --observed-responses``), each request is the three streams of
envoy/epp-observed.yaml: the pick (request headers and body in FULL_DUPLEX_STREAMED, then the
response headers), the ``first`` observer (the request headers with the pick's token, then the
response's first chunk; the rest of the TOKENS chunks only when the picker reads on, which a
PING after the first chunk tells: its answer comes after the picker's end of the stream, if it
ended it) and the ``end`` observer (the request headers, ended with the response). A request
counts when all three streams ended and the pick named a destination.

``python -m epp.bench.extprocload HOST PORT CONNECTIONS STREAMS SECONDS [TOKENS [observed]]`` prints a
JSON line: picks, errors, seconds, and the client's own CPU seconds."""

from __future__ import annotations

import asyncio
import json
import resource
import struct
import sys
import time
from dataclasses import dataclass
from typing import cast

import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as modes
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.bench.loadgen import request_body

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
PICKED = b"x-gateway-destination-endpoint"
BIG_WINDOW = 2**31 - 1 - 65535


def _frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", sid) + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, new name (lengths < 127)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes((len(n),)) + n + bytes((len(v),)) + v


def _grpc(message: pb.ProcessingRequest) -> bytes:
    data: bytes = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(data)) + data


def response_payload(tokens: int) -> bytes:
    """The response side Envoy sends in FULL_DUPLEX_STREAMED gateway mode for an SSE stream of
    ``tokens`` events, one per chunk: its headers, each chunk, the last one with the usage."""
    headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in (
        (":status", "200"), ("content-type", "text/event-stream"))])
    out = [_grpc(pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=headers)))]
    event = b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" tok"}]}\n\n'
    for _ in range(tokens):
        out.append(_grpc(pb.ProcessingRequest(response_body=pb.HttpBody(body=event))))
    last = (b'data: {"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":600,"completion_tokens":%d,'
            b'"total_tokens":%d}}\n\ndata: [DONE]\n\n' % (tokens, tokens + 600))
    out.append(_grpc(pb.ProcessingRequest(response_body=pb.HttpBody(body=last, end_of_stream=True))))
    return b"".join(out)


def stream_frames(authority: str, body: bytes, tokens: int = 0) -> tuple[bytes, bytes]:
    """One stream's HEADERS block and its request DATA payload (the two ext_proc messages; with
    ``tokens``, in FULL_DUPLEX_STREAMED mode, else BUFFERED without response processing)."""
    block = b"".join(_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
        (":authority", authority), ("content-type", "application/grpc"), ("te", "trailers")))
    headers = base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in (
            (":method", "POST"), (":path", "/v1/completions"), (":authority", "gateway"),
            ("content-type", "application/json"), ("content-length", str(len(body))))])
    first = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=headers),
        protocol_config=pb.ProtocolConfiguration(
            request_body_mode=modes.ProcessingMode.FULL_DUPLEX_STREAMED if tokens else modes.ProcessingMode.BUFFERED,
            response_body_mode=modes.ProcessingMode.FULL_DUPLEX_STREAMED if tokens else modes.ProcessingMode.NONE))
    second = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
    return block, _grpc(first) + _grpc(second)


class _Client(asyncio.Protocol):
    """What both load shapes share: the preface, frames split out of each read, the picker's
    SETTINGS and PINGs answered, its connection window given back; ``_frame_in`` handles the rest
    of each frame and says how many streams (or requests) it ended, ``_start`` opens that many new."""

    def __init__(self, at_once: int, until: float, done: asyncio.Future[None]) -> None:
        self.at_once, self.until, self.done = at_once, until, done
        self.transport: asyncio.Transport | None = None
        self.next_sid = 1
        self.buf = bytearray()
        self.picks = self.errors = 0
        self.unacked = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        settings = struct.pack(">HI", 0x4, 2**31 - 1) + struct.pack(">HI", 0x3, 1000)
        t.write(PREFACE + _frame(SETTINGS, 0, 0, settings) + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", BIG_WINDOW)))
        self._start(self.at_once)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        ended = 0
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            if len(buf) - pos < 9 + length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            payload = bytes(buf[pos + 9:pos + 9 + length])
            pos += 9 + length
            if kind == DATA:
                self.unacked += length
            if kind in (SETTINGS, PING) and not flags & ACK:
                assert self.transport is not None
                self.transport.write(_frame(kind, ACK, 0, b"" if kind == SETTINGS else payload))
            else:
                ended += self._frame_in(kind, flags, sid, payload)
        del buf[:pos]
        if self.unacked > 1 << 20 and self.transport is not None:
            self.transport.write(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.unacked)))
            self.unacked = 0
        if ended or not self._in_flight():
            self._start(ended)

    def connection_lost(self, exc: Exception | None) -> None:
        self.errors += self._in_flight()
        self._drop_all()
        if not self.done.done():
            self.done.set_result(None)

    def _start(self, n: int) -> None:
        raise NotImplementedError

    def _frame_in(self, kind: int, flags: int, sid: int, payload: bytes) -> int:
        raise NotImplementedError

    def _in_flight(self) -> int:
        raise NotImplementedError

    def _drop_all(self) -> None:
        raise NotImplementedError


class _Connection(_Client):
    """One HTTP/2 connection keeping ``streams`` ext_proc streams open, one new as each ends."""

    def __init__(self, block: bytes, payload: bytes, streams: int, until: float, done: asyncio.Future[None],
                 response: bytes = b"") -> None:
        super().__init__(streams, until, done)
        self.block, self.payload = block, payload
        self.response = response  # sent once the pick's answer is in (gateway mode); b"": the stream ends
        self.open: dict[int, bool] = {}  # stream id -> its answer named a destination
        self.window = 65535  # what the server lets this connection send

    def _start(self, n: int) -> None:
        assert self.transport is not None
        out = []
        size = len(self.payload) + len(self.response)
        while n > 0 and self.window >= size and time.monotonic() < self.until:
            sid = self.next_sid
            self.next_sid += 2
            self.open[sid] = False
            self.window -= len(self.payload)
            out.append(_frame(HEADERS, END_HEADERS, sid, self.block))
            out.append(_frame(DATA, 0 if self.response else END_STREAM, sid, self.payload))
            n -= 1
        if out:
            self.transport.write(b"".join(out))
        elif not self.open and not self.done.done():
            self.transport.close()

    def _frame_in(self, kind: int, flags: int, sid: int, payload: bytes) -> int:
        ended = 0
        if kind == DATA:
            if sid in self.open and not self.open[sid] and PICKED in payload:
                self.open[sid] = True
                if self.response:
                    self._respond(sid)
        elif kind == WINDOW_UPDATE and sid == 0:
            self.window += int.from_bytes(payload, "big") & 0x7FFFFFFF
        elif kind == RST_STREAM and sid in self.open:
            del self.open[sid]
            self.errors += 1
            ended += 1
        elif kind == GOAWAY:
            self.errors += len(self.open)
            self.open.clear()
        if kind in (HEADERS, DATA) and flags & END_STREAM and sid in self.open:
            if self.open.pop(sid):
                self.picks += 1
            else:
                self.errors += 1
            ended += 1
        return ended

    def _in_flight(self) -> int:
        return len(self.open)

    def _drop_all(self) -> None:
        self.open.clear()

    def _respond(self, sid: int) -> None:
        """The pick is in: the pod's response goes through the picker (its headers, every chunk)."""
        assert self.transport is not None
        self.window -= len(self.response)  # (the window was checked for both halves at the start)
        self.transport.write(_frame(DATA, END_STREAM, sid, self.response))



TOKEN_HEADER = b"x-epp-observed-pick"


@dataclass
class _Request:
    """One request's three streams, as they go."""

    streams: int = 3  # still open
    picked: bool = False
    failed: bool = False
    token: str = ""


def _observed(message: pb.ProcessingRequest) -> bytes:
    message.observability_mode = True
    return _grpc(message)


class _ObservedConnection(_Client):
    """One HTTP/2 connection keeping ``requests`` requests open, each as epp-observed.yaml's three
    ext_proc streams (the pick, the first observer, the end observer)."""

    def __init__(self, authority: str, body: bytes, tokens: int, requests: int, until: float,
                 done: asyncio.Future[None]) -> None:
        super().__init__(requests, until, done)
        base = [(":method", "POST"), (":scheme", "http"),
                (":path", "/envoy.service.ext_proc.v3.ExternalProcessor/Process"), (":authority", authority),
                ("content-type", "application/grpc"), ("te", "trailers")]
        self.blocks = {role: b"".join(_literal(k, v) for k, v in base + ([("x-epp-observer", role)] if role else []))
                       for role in ("", "first", "end")}
        self.request_headers = [(":method", "POST"), (":path", "/v1/completions"), (":authority", "gateway"),
                                ("content-type", "application/json")]
        headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                              for k, v in self.request_headers])
        first = pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(headers=headers),
            protocol_config=pb.ProtocolConfiguration(request_body_mode=modes.ProcessingMode.FULL_DUPLEX_STREAMED,
                                                     response_body_mode=modes.ProcessingMode.NONE))
        self.pick_payload = _grpc(first) + _grpc(pb.ProcessingRequest(request_body=pb.HttpBody(body=body,
                                                                                               end_of_stream=True)))
        status = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")])
        self.response_headers = _grpc(pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=status)))
        event = b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" tok"}]}\n\n'
        self.first_chunk = _observed(pb.ProcessingRequest(response_body=pb.HttpBody(body=event)))
        last = (b'data: {"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":600,"completion_tokens":%d,'
                b'"total_tokens":%d}}\n\ndata: [DONE]\n\n' % (tokens, tokens + 600))
        self.rest = self.first_chunk * max(0, tokens - 1) + _observed(
            pb.ProcessingRequest(response_body=pb.HttpBody(body=last, end_of_stream=True)))
        self.open = 0  # requests in flight
        self.role: dict[int, tuple[str, int]] = {}  # stream id -> (role, the request's pick stream id)
        self.state: dict[int, _Request] = {}  # pick stream id -> the request's progress
        self.pings: dict[int, int] = {}  # first observer stream id (a PING's payload) -> its request

    def _sid(self, role: str, request: int) -> int:
        sid = self.next_sid
        self.next_sid += 2
        self.role[sid] = (role, request or sid)
        return sid

    def _start(self, n: int) -> None:
        assert self.transport is not None
        out = []
        while n > 0 and time.monotonic() < self.until:
            sid = self._sid("pick", 0)
            self.state[sid] = _Request()
            self.open += 1
            out.append(_frame(HEADERS, END_HEADERS, sid, self.blocks[""]))
            out.append(_frame(DATA, 0, sid, self.pick_payload))
            n -= 1
        if out:
            self.transport.write(b"".join(out))
        elif not self.open and not self.done.done():
            self.transport.close()

    def _observer_headers(self, token: str) -> bytes:
        headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                              for k, v in (*self.request_headers, (TOKEN_HEADER.decode(), token))])
        return _observed(pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=headers)))

    def _picked(self, request: int, payload: bytes) -> None:
        """The pick's answer: the response headers go to the pick stream, the first observer opens."""
        assert self.transport is not None
        st = self.state[request]
        token = ""
        for message in _messages(payload):
            answer = pb.ProcessingResponse.FromString(message)
            for h in answer.request_headers.response.header_mutation.set_headers:
                if h.header.key == TOKEN_HEADER.decode():
                    token = (h.header.raw_value or h.header.value.encode()).decode()
        if not token:
            return
        st.picked, st.token = True, token
        first = self._sid("first", request)
        self.pings[first] = request
        self.transport.write(_frame(DATA, END_STREAM, request, self.response_headers)
                             + _frame(HEADERS, END_HEADERS, first, self.blocks["first"])
                             + _frame(DATA, 0, first, self._observer_headers(token) + self.first_chunk)
                             + _frame(PING, 0, 0, struct.pack(">Q", first)))

    def _pinged(self, first: int) -> None:
        """The picker has read the first chunk: the rest of the response if it reads on, then the end."""
        assert self.transport is not None
        request = self.pings.pop(first, 0)
        st = self.state.get(request)
        if st is None:
            return
        out = []
        if first in self.role:  # not ended by the picker: it reads to the end
            out.append(_frame(DATA, END_STREAM, first, self.rest))
        end = self._sid("end", request)
        out.append(_frame(HEADERS, END_HEADERS, end, self.blocks["end"]))
        out.append(_frame(DATA, END_STREAM, end, self._observer_headers(st.token)))
        self.transport.write(b"".join(out))

    def _ended(self, sid: int, ok: bool) -> int:
        role, request = self.role.pop(sid, ("", 0))
        st = self.state.get(request)
        if st is None:
            return 0
        if not ok:
            st.failed = True
        if role == "pick" and not st.picked:
            st.streams = 1  # refused: no observers follow
        st.streams -= 1
        if st.streams > 0:
            return 0
        del self.state[request]
        self.open -= 1
        if st.failed or not st.picked:
            self.errors += 1
        else:
            self.picks += 1
        return 1

    def _frame_in(self, kind: int, flags: int, sid: int, payload: bytes) -> int:
        ended = 0
        if kind == DATA:
            role, request = self.role.get(sid, ("", 0))
            if role == "pick" and not self.state[request].picked and PICKED in payload:
                self._picked(request, payload)
        elif kind == PING:  # (an ACK: the picker has read up to a first chunk)
            self._pinged(struct.unpack(">Q", payload)[0])
        elif kind == RST_STREAM and sid in self.role:
            ended += self._ended(sid, False)
        elif kind == GOAWAY:
            self.errors += self.open
            self._drop_all()
        if kind == HEADERS and flags & END_STREAM and sid in self.role:
            ended += self._ended(sid, True)
        return ended

    def _in_flight(self) -> int:
        return self.open

    def _drop_all(self) -> None:
        self.state.clear()
        self.open = 0


def _messages(payload: bytes) -> list[bytes]:
    """The gRPC messages in one DATA payload (the picker writes whole messages)."""
    out, pos = [], 0
    while len(payload) - pos >= 5:
        n = int.from_bytes(payload[pos + 1:pos + 5], "big")
        out.append(payload[pos + 5:pos + 5 + n])
        pos += 5 + n
    return out


async def run(host: str, port: int, connections: int, streams: int, seconds: float,
              tokens: int = 0, observed: bool = False) -> dict[str, float]:
    block, payload = stream_frames(f"{host}:{port}", request_body(), tokens)
    response = response_payload(tokens) if tokens else b""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    until = start + seconds
    conns: list[_Connection | _ObservedConnection] = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        def connection(d: asyncio.Future[None] = done) -> _Connection | _ObservedConnection:
            if observed:
                return _ObservedConnection(f"{host}:{port}", request_body(), max(tokens, 1), streams, until, d)
            return _Connection(block, payload, streams, until, d, response)

        _, proto = await loop.create_connection(connection, host, port)
        conns.append(proto)
    await asyncio.wait_for(asyncio.gather(*(c.done for c in conns)), seconds + 30)
    elapsed = time.monotonic() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"picks": sum(c.picks for c in conns), "errors": sum(c.errors for c in conns), "seconds": elapsed,
            "client_cpu_s": usage.ru_utime + usage.ru_stime}


def main(argv: list[str]) -> int:
    host, port, connections, streams, seconds = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4])
    tokens = int(argv[5]) if len(argv) > 5 else 0
    observed = len(argv) > 6 and argv[6] == "observed"
    result = uvloop.run(run(host, port, connections, streams, seconds, tokens, observed))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
