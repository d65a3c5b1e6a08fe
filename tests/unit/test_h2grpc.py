"""The HTTP/2 gRPC server's protocol handling, against a recording fake transport."""

from __future__ import annotations

import struct
from typing import Any

from hpack import Decoder, Encoder

from epp.server import h2grpc as h2


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, b: bytes) -> None:
        self.data += b

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> Any:
        return None

    def close(self) -> None:
        self.closed = True


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
    conn = h2.H2Connection({"/t.S/Echo": Echo}, 1 << 20, lambda c: None)
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
    conn = h2.H2Connection({}, 1 << 20, lambda c: None)
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

    conn = h2.H2Connection({"/t.S/Echo": factory}, 1 << 20, lambda c: None)
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
