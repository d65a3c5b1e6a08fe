"""The HTTP/2 gRPC server's protocol handling, against a recording fake transport."""

from __future__ import annotations

import struct

import pytest
from hpack import Decoder, Encoder

from epp.server import h2grpc as h2
from tests.fakes import FakeTransport


class Echo:
    """Echoes each message; finishes OK at the client's end of stream."""

    log: list[str] = []

    def __init__(self, responder: h2.Responder, headers: dict[str, str]) -> None:
        self.responder = responder

    def on_message(self, message: bytes) -> None:
        Echo.log.append("msg")
        self.responder.send(message)

    def on_end(self) -> None:
        Echo.log.append("end")
        self.responder.finish()

    def on_reset(self) -> None:
        Echo.log.append("reset")


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos + 9 <= len(data):
        hi, lo, t, f, sid = struct.unpack_from(">BHBBL", data, pos)
        n = (hi << 16) | lo
        out.append((t, f, sid, bytes(data[pos + 9 : pos + 9 + n])))
        pos += 9 + n
    return out


def grpc_msg(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def setup(window: int = 1 << 24) -> tuple[h2.H2Connection, FakeTransport, Encoder]:
    Echo.log = []
    conn = h2.H2Connection({"/t.S/Echo": Echo}, h2.Limits(max_message=1 << 20), lambda c: None)
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    conn.data_received(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0, struct.pack(">HL", h2.SETTINGS_INITIAL_WINDOW_SIZE,
                                                                             window)))
    return conn, t, Encoder()


def req_headers(enc: Encoder, sid: int, path: str = "/t.S/Echo", flags: int = h2.END_HEADERS) -> bytes:
    block = enc.encode([(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
                        ("content-type", "application/grpc"), ("te", "trailers")])
    return h2.frame(h2.HEADERS, flags, sid, block)


def test_settings_ack_then_echo_with_trailers() -> None:
    conn, t, enc = setup()
    t.data.clear()
    conn.data_received(req_headers(enc, 1) + h2.frame(h2.DATA, 0, 1, grpc_msg(b"abc")))
    conn.data_received(h2.frame(h2.DATA, h2.END_STREAM, 1, grpc_msg(b"de")))
    got = frames(bytes(t.data))
    kinds = [(ft, fl) for ft, fl, _, _ in got]
    assert (h2.SETTINGS, h2.ACK) not in kinds  # already acked in setup
    assert kinds[0] == (h2.HEADERS, h2.END_HEADERS)
    dec = Decoder()
    assert dict(dec.decode(got[0][3])) == {":status": "200", "content-type": "application/grpc"}
    assert [p for ft, _, _, p in got if ft == h2.DATA] == [grpc_msg(b"abc"), grpc_msg(b"de")]
    assert kinds[-1] == (h2.HEADERS, h2.END_HEADERS | h2.END_STREAM)
    assert dict(dec.decode(got[-1][3])) == {"grpc-status": "0"}
    assert Echo.log == ["msg", "msg", "end"] and not conn.streams


def test_message_split_across_frames_padding_and_continuation() -> None:
    conn, t, enc = setup()
    block = enc.encode([(":method", "POST"), (":path", "/t.S/Echo"), ("content-type", "application/grpc")])
    conn.data_received(h2.frame(h2.HEADERS, 0, 3, block[:3]) + h2.frame(h2.CONTINUATION, h2.END_HEADERS, 3, block[3:]))
    msg = grpc_msg(b"x" * 100)
    padded = bytes([4]) + msg[:40] + b"\0" * 4
    conn.data_received(h2.frame(h2.DATA, h2.PADDED, 3, padded))
    conn.data_received(h2.frame(h2.DATA, h2.END_STREAM, 3, msg[40:]))
    data = [p for ft, _, sid, p in frames(bytes(t.data)) if ft == h2.DATA and sid == 3]
    assert data == [msg]


def test_unknown_method_gets_unimplemented_trailers_only() -> None:
    conn, t, enc = setup()
    t.data.clear()
    conn.data_received(req_headers(enc, 1, "/nope.S/X", h2.END_HEADERS | h2.END_STREAM))
    (ft, fl, _, block), = frames(bytes(t.data))
    assert ft == h2.HEADERS and fl & h2.END_STREAM
    assert dict(Decoder().decode(block))["grpc-status"] == "12"


def test_flow_control_blocks_then_resumes_on_window_update() -> None:
    conn, t, enc = setup(window=10)
    t.data.clear()
    conn.data_received(req_headers(enc, 1) + h2.frame(h2.DATA, h2.END_STREAM, 1, grpc_msg(b"y" * 30)))
    sent = [p for ft, _, _, p in frames(bytes(t.data)) if ft == h2.DATA]
    assert sent == []  # 35 bytes do not fit a 10-byte stream window; trailers wait too
    assert not any(fl & h2.END_STREAM for _, fl, _, _ in frames(bytes(t.data)))
    conn.data_received(h2.frame(h2.WINDOW_UPDATE, 0, 1, struct.pack(">L", 100)))
    got = frames(bytes(t.data))
    assert b"".join(p for ft, _, _, p in got if ft == h2.DATA) == grpc_msg(b"y" * 30)
    assert got[-1][1] & h2.END_STREAM


def test_ping_rst_and_compressed_messages() -> None:
    conn, t, enc = setup()
    t.data.clear()
    conn.data_received(h2.frame(h2.PING, 0, 0, b"12345678"))
    assert frames(bytes(t.data))[-1] == (h2.PING, h2.ACK, 0, b"12345678")
    conn.data_received(req_headers(enc, 1) + h2.frame(h2.RST_STREAM, 0, 1, struct.pack(">L", h2.CANCEL)))
    assert Echo.log == ["reset"] and not conn.streams
    t.data.clear()
    conn.data_received(req_headers(enc, 3) + h2.frame(h2.DATA, 0, 3, b"\x01" + (3).to_bytes(4, "big") + b"abc"))
    block = frames(bytes(t.data))[-1][3]
    assert dict(Decoder().decode(block))["grpc-status"] == "12"


def test_bad_preface_closes_with_goaway() -> None:
    conn = h2.H2Connection({}, h2.Limits(max_message=1 << 20), lambda c: None)
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert t.closed and frames(bytes(t.data))[-1][0] == h2.GOAWAY


def test_grpc_message_is_percent_encoded() -> None:
    block = h2.trailers_block(14, "no endpoint: 100%\n")
    assert dict(Decoder().decode(block)) == {"grpc-status": "14", "grpc-message": "no endpoint: 100%25%0A"}


def test_header_blocks_are_cached_only_while_the_dynamic_table_is_unchanged() -> None:
    from hpack import NeverIndexedHeaderTuple

    seen: list[dict[str, str]] = []

    def factory(responder: h2.Responder, headers: dict[str, str]) -> Echo:
        seen.append(headers)
        return Echo(responder, headers)

    conn = h2.H2Connection({"/t.S/Echo": factory}, h2.Limits(max_message=1 << 20), lambda c: None)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    conn.data_received(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0))
    enc = Encoder()
    path = NeverIndexedHeaderTuple(":path", "/t.S/Echo")  # a literal without indexing, as Envoy sends
    first = enc.encode([(":method", "POST"), path, ("x-tenant", "a")])  # inserts x-tenant: a
    again = enc.encode([(":method", "POST"), path, ("x-tenant", "a")])  # refers to dynamic index 62
    assert first != again
    sid = 1
    for block in (first, again, again, again):
        conn.data_received(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, sid, block))
        sid += 2
    assert [h["x-tenant"] for h in seen] == ["a"] * 4
    assert again in conn.header_cache and first not in conn.header_cache
    # Another insertion shifts the table: index 62 now means x-tenant: b, and the old bytes must say so.
    conn.data_received(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, sid,
                                enc.encode([(":method", "POST"), path, ("x-tenant", "b")])))
    conn.data_received(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, sid + 2, again))
    assert [h["x-tenant"] for h in seen[4:]] == ["b", "b"]
    assert all(h[":path"] == "/t.S/Echo" for h in seen)


def goaway_code(t: FakeTransport) -> int | None:
    """The error code of the GOAWAY written, if any (and the transport is closed)."""
    for ft, _, _, p in frames(bytes(t.data)):
        if ft == h2.GOAWAY:
            assert t.closed
            return int(struct.unpack_from(">L", p, 4)[0])
    return None


def _settings(ident: int, value: int) -> bytes:
    return h2.frame(h2.SETTINGS, 0, 0, struct.pack(">HL", ident, value))


# Connection errors of RFC 9113 that a client could send: each gets GOAWAY with the RFC's code.
RFC_CASES = [
    ("max frame size 0", _settings(h2.SETTINGS_MAX_FRAME_SIZE, 0), h2.PROTOCOL_ERROR),
    ("max frame size 2^24", _settings(h2.SETTINGS_MAX_FRAME_SIZE, 1 << 24), h2.PROTOCOL_ERROR),
    ("initial window 2^31", _settings(h2.SETTINGS_INITIAL_WINDOW_SIZE, 1 << 31), h2.FLOW_CONTROL_ERROR),
    ("enable push 2", _settings(h2.SETTINGS_ENABLE_PUSH, 2), h2.PROTOCOL_ERROR),
    ("settings of 5 bytes", h2.frame(h2.SETTINGS, 0, 0, b"\0" * 5), h2.FRAME_SIZE_ERROR),
    ("settings on a stream", h2.frame(h2.SETTINGS, 0, 1, b""), h2.PROTOCOL_ERROR),
    ("settings ack with payload", h2.frame(h2.SETTINGS, h2.ACK, 0, b"\0" * 6), h2.FRAME_SIZE_ERROR),
    ("2-byte window update", h2.frame(h2.WINDOW_UPDATE, 0, 0, b"\0\1"), h2.FRAME_SIZE_ERROR),
    ("window update of 0", h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">L", 0)), h2.PROTOCOL_ERROR),
    ("window overflow", h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">L", 2**31 - 1)), h2.FLOW_CONTROL_ERROR),
    ("7-byte ping", h2.frame(h2.PING, 0, 0, b"1234567"), h2.FRAME_SIZE_ERROR),
    ("ping on a stream", h2.frame(h2.PING, 0, 1, b"12345678"), h2.PROTOCOL_ERROR),
    ("rst on stream 0", h2.frame(h2.RST_STREAM, 0, 0, b"\0\0\0\0"), h2.PROTOCOL_ERROR),
    ("3-byte rst", h2.frame(h2.RST_STREAM, 0, 1, b"\0\0\0"), h2.FRAME_SIZE_ERROR),
    ("data on stream 0", h2.frame(h2.DATA, 0, 0, b"x"), h2.PROTOCOL_ERROR),
    ("headers on stream 0", h2.frame(h2.HEADERS, h2.END_HEADERS, 0, b"\x82"), h2.PROTOCOL_ERROR),
    ("garbage HPACK", h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"\xff\xff\xff\xff\xff"), h2.COMPRESSION_ERROR),
    ("push promise", h2.frame(h2.PUSH_PROMISE, h2.END_HEADERS, 1, b"\0\0\0\2"), h2.PROTOCOL_ERROR),
    ("even stream id", None, h2.PROTOCOL_ERROR),
    ("padding past the payload", h2.frame(h2.HEADERS, h2.END_HEADERS | h2.PADDED, 1, b"\x09\x82"), h2.PROTOCOL_ERROR),
    ("frame above our max size", h2.frame(h2.DATA, 0, 1, b"")[:0] + struct.pack(">BHBBL", 0x20, 0, h2.DATA, 0, 1),
     h2.FRAME_SIZE_ERROR),
    ("continuation without headers", h2.frame(h2.CONTINUATION, h2.END_HEADERS, 1, b"\x82"), h2.PROTOCOL_ERROR),
]


@pytest.mark.parametrize("name,data,code", RFC_CASES, ids=[c[0] for c in RFC_CASES])
def test_connection_errors_get_goaway_with_the_rfc_code(name: str, data: bytes | None, code: int) -> None:
    conn, t, enc = setup()
    t.data.clear()
    if data is None:
        data = req_headers(enc, 2)
    conn.data_received(data)  # never raises
    assert goaway_code(t) == code


def test_garbage_hpack_in_trailers_is_a_compression_error() -> None:
    conn, t, enc = setup()
    conn.data_received(req_headers(enc, 1) + h2.frame(h2.DATA, 0, 1, grpc_msg(b"a")))
    t.data.clear()
    conn.data_received(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, b"\xff\xff\xff\xff\xff"))
    assert goaway_code(t) == h2.COMPRESSION_ERROR


def test_continuation_flood_is_refused_at_the_header_block_limit() -> None:
    Echo.log = []
    conn = h2.H2Connection({"/t.S/Echo": Echo}, h2.Limits(max_header_block=4096), lambda c: None)
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    conn.data_received(h2.PREFACE + h2.frame(h2.HEADERS, 0, 1, b"\x82"))
    sent = 0
    while not t.closed and sent < 1 << 20:
        conn.data_received(h2.frame(h2.CONTINUATION, 0, 1, b"\x00" * 1000))
        sent += 1000
    assert goaway_code(t) == h2.ENHANCE_YOUR_CALM
    assert sent <= 5000  # refused at the limit, not after a megabyte
    assert not conn.buf


def test_partial_messages_are_bounded_per_connection() -> None:
    Echo.log = []
    limits = h2.Limits(max_message=1 << 20, max_buffered=1 << 20)
    conn = h2.H2Connection({"/t.S/Echo": Echo}, limits, lambda c: None)
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    enc = Encoder()
    conn.data_received(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0))
    chunk = b"\0" * 16000
    for sid in (1, 3, 5):  # three streams, each holding most of a 1 MiB message
        conn.data_received(req_headers(enc, sid) + h2.frame(h2.DATA, 0, sid, b"\x00" + (1 << 20).to_bytes(4, "big")))
        for _ in range(40):
            conn.data_received(h2.frame(h2.DATA, 0, sid, chunk))
    assert conn.buffered <= limits.max_buffered
    refused = {sid: dict(Decoder().decode(p)).get("grpc-status") for ft, fl, sid, p in frames(bytes(t.data))
               if ft == h2.HEADERS and fl & h2.END_STREAM}
    # 640 KB each: the first fits; the second and third pass the limit and get RESOURCE_EXHAUSTED.
    assert refused == {3: "8", 5: "8"} and conn.buffered == len(conn.streams[1].buf)
    # More data for the refused stream is dropped, not buffered.
    before = conn.buffered
    for _ in range(40):
        conn.data_received(h2.frame(h2.DATA, 0, 5, chunk))
    assert conn.buffered == before


def test_a_message_above_the_limit_is_refused_and_its_bytes_dropped() -> None:
    conn, t, enc = setup()
    conn.data_received(req_headers(enc, 1) + h2.frame(h2.DATA, 0, 1, b"\x00" + (2 << 20).to_bytes(4, "big")))
    for _ in range(100):
        conn.data_received(h2.frame(h2.DATA, 0, 1, b"\0" * 16000))
    assert conn.buffered == 0 and not conn.streams[1].buf
    trailers = [p for ft, fl, _, p in frames(bytes(t.data)) if ft == h2.HEADERS and fl & h2.END_STREAM]
    assert dict(Decoder().decode(trailers[-1]))["grpc-status"] == "8"


def test_a_response_message_over_the_send_limit_ends_the_call_resource_exhausted() -> None:
    Echo.log = []
    conn = h2.H2Connection({"/t.S/Echo": Echo}, h2.Limits(max_message=1 << 20, max_send=64), lambda c: None)
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    conn.data_received(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0))
    enc = Encoder()
    t.data.clear()
    conn.data_received(req_headers(enc, 1) + h2.frame(h2.DATA, 0, 1, grpc_msg(b"s" * 64)))
    conn.data_received(h2.frame(h2.DATA, h2.END_STREAM, 1, grpc_msg(b"b" * 65)))
    got = frames(bytes(t.data))
    assert [p for ft, _, _, p in got if ft == h2.DATA] == [grpc_msg(b"s" * 64)]  # 64 bytes: at the limit, sent
    trailers = dict(Decoder().decode(got[-1][3]))
    assert trailers["grpc-status"] == "8" and "grpc-max-send-msg-size" in trailers["grpc-message"]


class Held:
    """Answers later, outside the connection's read (as a pick the state process releases)."""

    held: list[h2.Responder] = []

    def __init__(self, responder: h2.Responder, headers: dict[str, str]) -> None:
        Held.held.append(responder)

    def on_message(self, message: bytes) -> None:
        pass

    def on_end(self) -> None:
        pass

    def on_reset(self) -> None:
        pass


async def test_answers_sent_outside_a_read_go_out_in_one_write_at_the_end_of_the_loop_turn() -> None:
    import asyncio

    Held.held = []
    conn = h2.H2Connection({"/t.S/Held": Held}, h2.Limits(max_message=1 << 20), lambda c: None)
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    enc = Encoder()
    calls = b"".join(req_headers(enc, sid, "/t.S/Held") + h2.frame(h2.DATA, h2.END_STREAM, sid, grpc_msg(b"q"))
                     for sid in (1, 3, 5))
    conn.data_received(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0, b"") + calls)
    writes = t.writes
    for i, responder in enumerate(Held.held):
        responder.send(f"answer {i}".encode())
        responder.finish()
        responder.flush()
    assert t.writes == writes  # nothing yet: the turn may release more
    await asyncio.sleep(0)
    assert t.writes == writes + 1
    got = frames(bytes(t.data))
    assert [p for ft, _, _, p in got if ft == h2.DATA] == [grpc_msg(f"answer {i}".encode()) for i in range(3)]
    assert sorted(sid for ft, fl, sid, _ in got if ft == h2.HEADERS and fl & h2.END_STREAM) == [1, 3, 5]
