"""A lean HTTP/2 gRPC server for epp's gRPC port (ext_proc streams and the epp.v1 API).

Why not grpcio here: measured on these machines, grpcio (aio or sync) spends ~380 us of CPU per
stream plus ~155 us per message in its own machinery; an ext_proc stream in gateway mode carries
~11 messages, so the floor was ~1.3 ms of picker CPU per request before any routing work. This
server is an asyncio Protocol: it parses frames straight off the socket buffer, hands each gRPC
message to a synchronous per-stream handler (the ext_proc logic is pure CPU), and writes every
frame produced while handling one socket read in a single ``transport.write``. No task, future
or coroutine is created per stream or per message.

What it implements of HTTP/2 (RFC 9113) is what gRPC clients use: the preface; SETTINGS (ack,
peer INITIAL_WINDOW_SIZE and MAX_FRAME_SIZE); PING; WINDOW_UPDATE with full send-side flow
control; HEADERS + CONTINUATION decoded with a real HPACK decoder (``hpack``); DATA with padding;
RST_STREAM; GOAWAY. Responses use HPACK literals without indexing (no encoder state).
Compressed gRPC messages are refused (we never advertise an encoding).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from hpack import Decoder
from hpack.exceptions import HPACKError

log = logging.getLogger("epp.h2grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x1, 0x2, 0x4
SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x5, 0x6
MAX_WINDOW = 2**31 - 1
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, CANCEL = 0, 1, 2, 3, 6, 8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB
OUR_MAX_FRAME = 1 << 20  # the SETTINGS_MAX_FRAME_SIZE we advertise
MAX_MESSAGE = 64 * 1024 * 1024  # the default --grpc-max-recv-msg-size


class ConnectionError_(Exception):
    """A connection error (RFC 9113 section 5.4.1): GOAWAY with ``code``, then close."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(slots=True)
class Activity:
    """When the server's last stream opened (monotonic time): a drain waits for quiet."""

    last_stream_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client connection may make the server hold (see the README's limits table)."""

    max_message: int = MAX_MESSAGE  # one gRPC message (--grpc-max-recv-msg-size)
    max_header_block: int = 64 * 1024  # one HEADERS + CONTINUATION block (--grpc-max-header-list-size)
    max_buffered: int = 128 * 1024 * 1024  # partial messages of all streams (--grpc-max-buffered-bytes)
    max_send: int = 2 * MAX_MESSAGE  # one message the server sends (--grpc-max-send-msg-size)

# gRPC status codes used here.
OK, INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = (
    0, 3, 4, 8, 12, 13, 14, 16)
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_timeout(headers: dict[str, str]) -> float | None:
    """The call's deadline in seconds from its ``grpc-timeout`` header (None: none, or malformed)."""
    value = headers.get("grpc-timeout", "")
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit

_HEADER = struct.Struct(">BHBBL")  # 24-bit length as (high byte, low 16 bits), type, flags, stream id


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEADER.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK 'literal header field without indexing, new name' (no Huffman)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# ":status: 200" is static-table index 8 (indexed field 0x88).
RESPONSE_HEADERS = b"\x88" + _literal(b"content-type", b"application/grpc")


def trailers_block(status: int, message: str = "") -> bytes:
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        safe = "".join(c if 0x20 <= ord(c) < 0x7F and c != "%" else f"%{ord(c):02X}" for c in message)
        block += _literal(b"grpc-message", safe.encode("ascii"))
    return block


_OK_TRAILERS = trailers_block(OK)


class Responder(Protocol):
    @property
    def peer(self) -> str: ...  # the client's address (host only), for per-client limits
    def send(self, message: bytes) -> None: ...
    def finish(self, status: int = OK, message: str = "") -> None: ...
    def flush(self) -> None: ...


class RpcHandler(Protocol):
    """One gRPC call. Methods run synchronously inside the connection's read loop."""

    def on_message(self, message: bytes) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self) -> None: ...


HandlerFactory = Callable[[Responder, dict[str, str]], RpcHandler]


class _Stream:
    __slots__ = (
        "buf",
        "conn",
        "finished",
        "handler",
        "headers_sent",
        "pending",
        "remote_closed",
        "send_window",
        "sid",
        "trailer",
    )

    def __init__(self, conn: H2Connection, sid: int, send_window: int) -> None:
        self.conn = conn
        self.sid = sid
        self.send_window = send_window
        self.buf = bytearray()
        self.handler: RpcHandler | None = None
        self.headers_sent = False
        self.remote_closed = False
        self.finished = False
        self.pending: deque[bytes] = deque()
        self.trailer: bytes | None = None

    # Responder
    @property
    def peer(self) -> str:
        return self.conn.peer

    def send(self, message: bytes) -> None:
        if self.finished:
            return
        conn = self.conn
        if len(message) > conn.limits.max_send:
            self.finish(RESOURCE_EXHAUSTED, f"response message of {len(message)} bytes exceeds the send limit of "
                                            f"{conn.limits.max_send} bytes (--grpc-max-send-msg-size)")
            return
        if not self.headers_sent:
            self.headers_sent = True
            conn.out.append(frame(HEADERS, END_HEADERS, self.sid, RESPONSE_HEADERS))
        data = b"\x00" + len(message).to_bytes(4, "big") + message
        if self.pending or len(data) > min(self.send_window, conn.send_window):
            # Wait for WINDOW_UPDATE (or a SETTINGS change), which flushes blocked streams.
            self.pending.append(data)
            conn.blocked.add(self)
            return
        conn.emit_data(self, data)

    def flush(self) -> None:
        """Write what was queued (sends made outside a read: a held pick released, a health
        Watch update) at the end of this loop turn, with whatever else the turn queues: the
        picks a batch from the state process releases go out in one write per connection."""
        self.conn.flush_soon()

    def finish(self, status: int = OK, message: str = "") -> None:
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        if not self.headers_sent:
            # Trailers-only response.
            self.headers_sent = True
            block = RESPONSE_HEADERS + (_OK_TRAILERS if status == OK and not message else
                                        trailers_block(status, message))
            conn.out.append(frame(HEADERS, END_HEADERS | END_STREAM, self.sid, block))
            conn.closed_stream(self)
            return
        block = _OK_TRAILERS if status == OK and not message else trailers_block(status, message)
        trailer = frame(HEADERS, END_HEADERS | END_STREAM, self.sid, block)
        if self.pending:
            self.trailer = trailer
        else:
            conn.out.append(trailer)
            conn.closed_stream(self)


class H2Connection(asyncio.Protocol):
    """One client connection (Envoy keeps a few, multiplexing every request's stream on them)."""

    def __init__(self, services: dict[str, HandlerFactory], limits: Limits, on_close: Callable[[H2Connection], None],
                 activity: Activity | None = None):
        self.services = services
        self.activity = activity or Activity()
        self.limits = limits
        self.max_message = limits.max_message
        self.buffered = 0  # bytes of partial messages held for all streams
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.flush_due = False  # a write at the end of this loop turn is due
        self.preface_seen = False
        self.streams: dict[int, _Stream] = {}
        self.decoder = Decoder(max_header_list_size=limits.max_header_block)
        self.header_cache: dict[bytes, dict[str, str]] = {}
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.send_window = 65535
        self.recv_consumed = 0
        self.last_stream_id = 0
        self.continuation: tuple[int, int, bytearray] | None = None  # (stream id, flags, block)
        self.blocked: set[_Stream] = set()
        self.closing = False
        self.peer = "unknown"

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have the same methods.
        self.transport = cast(asyncio.Transport, transport)
        name = transport.get_extra_info("peername")
        self.peer = str(name[0]) if isinstance(name, tuple) and name else "unknown"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        settings = (struct.pack(">HL", SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)
                    + struct.pack(">HL", SETTINGS_MAX_FRAME_SIZE, OUR_MAX_FRAME)
                    + struct.pack(">HL", SETTINGS_MAX_HEADER_LIST_SIZE, self.limits.max_header_block))
        self.transport.write(frame(SETTINGS, 0, 0, settings) +
                        frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", MAX_WINDOW - 65535)))

    def connection_lost(self, exc: Exception | None) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        self.buf = bytearray()
        self.buffered = 0
        for st in streams:
            self._reset_handler(st)
        self.on_close(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        try:
            pos = 0
            if not self.preface_seen:
                if len(buf) < len(PREFACE):
                    return
                if bytes(buf[: len(PREFACE)]) != PREFACE:
                    self._fatal(PROTOCOL_ERROR, "bad connection preface")
                    return
                self.preface_seen = True
                pos = len(PREFACE)
            n = len(buf)
            while n - pos >= 9:
                hi, lo, ftype, flags, sid = _HEADER.unpack_from(buf, pos)
                length = (hi << 16) | lo
                if length > OUR_MAX_FRAME:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {OUR_MAX_FRAME}")
                end = pos + 9 + length
                if end > n:
                    break
                payload = bytes(buf[pos + 9 : end])
                pos = end
                self._frame(ftype, flags, sid & 0x7FFFFFFF, payload)
                if self.transport is None or self.transport.is_closing():
                    return
            del buf[:pos]
        except ConnectionError_ as e:
            self._fatal(e.code, e.reason)
        except Exception as e:  # a case the checks missed: the connection ends, the process does not
            log.exception("HTTP/2 connection failed")
            self._fatal(INTERNAL_ERROR, f"internal error: {type(e).__name__}")
        finally:
            self._flush()

    # -- output ------------------------------------------------------------------------------------
    def flush_soon(self) -> None:
        if not self.flush_due:
            self.flush_due = True
            asyncio.get_running_loop().call_soon(self._turn_ended)

    def _turn_ended(self) -> None:
        self.flush_due = False
        self._flush()

    def _flush(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def emit_data(self, st: _Stream, data: bytes) -> None:
        """Queue DATA frames for ``data`` (the caller checked the windows)."""
        size = len(data)
        st.send_window -= size
        self.send_window -= size
        step = self.peer_max_frame
        if size <= step:
            self.out.append(frame(DATA, 0, st.sid, data))
            return
        view = memoryview(data)
        for i in range(0, size, step):
            self.out.append(frame(DATA, 0, st.sid, bytes(view[i : i + step])))

    def flush_blocked(self) -> None:
        """Send what flow control now allows, oldest stream data first."""
        for st in list(self.blocked):
            while st.pending:
                data = st.pending[0]
                room = min(st.send_window, self.send_window)
                if room <= 0:
                    break
                if len(data) <= room:
                    st.pending.popleft()
                    self.emit_data(st, data)
                else:
                    st.pending[0] = data[room:]
                    self.emit_data(st, data[:room])
            if not st.pending:
                self.blocked.discard(st)
                if st.trailer is not None:
                    self.out.append(st.trailer)
                    st.trailer = None
                    self.closed_stream(st)

    def closed_stream(self, st: _Stream) -> None:
        if st.remote_closed:
            self.streams.pop(st.sid, None)
        if self.closing and not self.streams and self.transport is not None:
            self._flush()
            self.transport.close()

    def _fatal(self, code: int, reason: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        log.warning("closing HTTP/2 connection: %s", reason)
        self.out.append(frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_stream_id, code) + reason.encode()[:200]))
        self._flush()
        self.buf.clear()
        self.transport.close()

    def goaway(self) -> None:
        """Graceful shutdown: no new streams; close once the open ones finish."""
        self.closing = True
        self.out.append(frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_stream_id, NO_ERROR)))
        self._flush()
        if not self.streams and self.transport is not None:
            self.transport.close()

    # -- frames -------------------------------------------------------------------------------------
    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self.continuation is not None and ftype != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, "expected CONTINUATION")
        check = _FRAME_CHECKS.get(ftype)
        if check is not None:
            check(flags, sid, payload)
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            self._headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            if self.continuation is None or self.continuation[0] != sid:
                raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
            block = self.continuation[2]
            if len(block) + len(payload) > self.limits.max_header_block:
                raise ConnectionError_(ENHANCE_YOUR_CALM,
                                       f"header block exceeds {self.limits.max_header_block} bytes")
            block.extend(payload)
            if flags & END_HEADERS:
                csid, cflags, block = self.continuation
                self.continuation = None
                self._open_stream(csid, cflags, bytes(block))
        elif ftype == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
                self.out.append(frame(SETTINGS, ACK, 0))
        elif ftype == WINDOW_UPDATE:
            inc = struct.unpack(">L", payload)[0] & 0x7FFFFFFF
            if sid == 0:
                if inc == 0:
                    raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
                self.send_window += inc
                if self.send_window > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            else:
                st = self.streams.get(sid)
                if st is not None and inc > 0:
                    st.send_window += inc
                    if st.send_window > MAX_WINDOW:
                        self._reset_stream(st, FLOW_CONTROL_ERROR)
            if self.blocked:
                self.flush_blocked()
        elif ftype == PING:
            if not flags & ACK:
                self.out.append(frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            st = self.streams.pop(sid, None)
            if st is not None:
                self._drop_buffer(st)
                self.blocked.discard(st)
                st.finished = True
                self._reset_handler(st)
        elif ftype == GOAWAY:
            self.closing = True
            if not self.streams and self.transport is not None:
                self.transport.close()
        elif ftype == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "clients cannot push")
        # PRIORITY and unknown frame types are ignored, as the RFC requires.

    def _settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            ident, value = struct.unpack_from(">HL", payload, i)
            if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} above 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self.streams.values():
                    st.send_window += delta
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if not 16384 <= value <= 2**24 - 1:
                    raise ConnectionError_(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} outside [2^14, 2^24-1]")
                self.peer_max_frame = value
            elif ident == SETTINGS_ENABLE_PUSH and value > 1:
                raise ConnectionError_(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
            elif ident == SETTINGS_HEADER_TABLE_SIZE:
                pass  # we never index what we send
        if self.blocked:
            self.flush_blocked()

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        pad = 0
        start = 0
        if flags & PADDED:
            if not payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "PADDED HEADERS without a pad length")
            pad = payload[0]
            start = 1
        if flags & PRIORITY_FLAG:
            start += 5
        if start + pad > len(payload):
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS padding exceeds the payload")
        block = payload[start : len(payload) - pad]
        if len(block) > self.limits.max_header_block:
            raise ConnectionError_(ENHANCE_YOUR_CALM, f"header block exceeds {self.limits.max_header_block} bytes")
        if sid in self.streams:
            # Trailers from the client: the request side is done.
            if not flags & END_HEADERS:
                self.continuation = (sid, flags, bytearray(block))
                return
            self._decode_checked(block)
            self._remote_end(self.streams[sid])
            return
        if not flags & END_HEADERS:
            self.continuation = (sid, flags, bytearray(block))
            return
        self._open_stream(sid, flags, block)

    def _decode(self, block: bytes) -> dict[str, str]:
        # Envoy sends the same block for every stream (indexed fields plus ':path' as a Huffman
        # literal without indexing). A block that left the dynamic table as it was means the
        # same thing every time while the table stays so: cache it. A block that changed the
        # table (an insertion, an eviction, a size update) empties the cache.
        cached = self.header_cache.get(block)
        if cached is not None:
            return cached
        entries = self.decoder.header_table.dynamic_entries
        size = len(entries)
        newest = entries[0] if size else None
        headers: dict[str, str] = {str(k): str(v) for k, v in self.decoder.decode(block)}
        if len(entries) == size and (entries[0] if size else None) is newest:
            if len(self.header_cache) < 256 and len(block) <= 1024:
                self.header_cache[block] = headers
        else:
            self.header_cache.clear()
        return headers

    def _decode_checked(self, block: bytes) -> dict[str, str]:
        """The header block decoded; a bad block is a COMPRESSION_ERROR for the connection
        (the HPACK table is shared, so nothing after it could be decoded either)."""
        try:
            return self._decode(block)
        except (HPACKError, UnicodeDecodeError, ValueError, IndexError) as e:
            raise ConnectionError_(COMPRESSION_ERROR, f"HPACK: {type(e).__name__}: {e}") from None

    def _open_stream(self, sid: int, flags: int, block: bytes) -> None:
        if sid in self.streams:  # trailers that needed CONTINUATION
            self._decode_checked(block)
            self._remote_end(self.streams[sid])
            return
        headers = self._decode_checked(block)
        if sid <= self.last_stream_id or sid % 2 == 0:
            raise ConnectionError_(PROTOCOL_ERROR, f"bad stream id {sid}")
        self.last_stream_id = sid
        self.activity.last_stream_at = time.monotonic()
        st = _Stream(self, sid, self.peer_initial_window)
        self.streams[sid] = st
        if self.closing:
            st.finish(UNAVAILABLE, "server shutting down")
            st.remote_closed = True
            self.closed_stream(st)
            return
        factory = self.services.get(headers.get(":path", ""))
        if factory is None:
            st.remote_closed = bool(flags & END_STREAM)
            self._refuse(st, UNIMPLEMENTED, f"unknown method {headers.get(':path', '')}")
            return
        try:
            st.handler = factory(st, headers)
        except Exception:
            log.exception("handler for %s failed to start", headers.get(":path"))
            self._refuse(st, INTERNAL, "internal error")
            return
        if flags & END_STREAM:
            self._remote_end(st)

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        self.recv_consumed += len(payload)
        if self.recv_consumed > 1 << 30:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", self.recv_consumed)))
            self.recv_consumed = 0
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ConnectionError_(PROTOCOL_ERROR, "DATA padding exceeds the payload")
            payload = payload[1 : len(payload) - payload[0]]
        st = self.streams.get(sid)
        if st is None:
            return  # a stream we already finished or reset
        if st.finished:  # answered early (refused, failed): the rest of its request is dropped
            self._drop_buffer(st)
            if flags & END_STREAM:
                self._remote_end(st)
            return
        buf = st.buf
        if not buf and len(payload) >= 5:
            mlen = int.from_bytes(payload[1:5], "big")
            if len(payload) == 5 + mlen and payload[0] == 0:  # the common case: exactly one message
                if mlen > self.max_message:
                    self._refuse(st, RESOURCE_EXHAUSTED, f"message of {mlen} bytes exceeds {self.max_message}")
                else:
                    self._deliver(st, payload[5:])
                if flags & END_STREAM:
                    self._remote_end(st)
                return
        held = len(buf)
        buf += payload
        while len(buf) >= 5 and not st.finished:
            if buf[0] != 0:
                self._refuse(st, UNIMPLEMENTED, "compressed messages are not supported")
                break
            mlen = int.from_bytes(buf[1:5], "big")
            if mlen > self.max_message:
                self._refuse(st, RESOURCE_EXHAUSTED, f"message of {mlen} bytes exceeds {self.max_message}")
                break
            if len(buf) < 5 + mlen:
                break
            message = bytes(buf[5 : 5 + mlen])
            del buf[: 5 + mlen]
            self._deliver(st, message)
        self.buffered += len(buf) - held
        if st.finished:
            self._drop_buffer(st)
        elif self.buffered > self.limits.max_buffered:
            self._drop_buffer(st)
            self._refuse(st, RESOURCE_EXHAUSTED, f"connection holds more than {self.limits.max_buffered} bytes of "
                                          "partial messages")
        if flags & END_STREAM:
            self._remote_end(st)

    def _drop_buffer(self, st: _Stream) -> None:
        self.buffered -= len(st.buf)
        st.buf = bytearray()

    def _reset_stream(self, st: _Stream, code: int) -> None:
        """A stream error: RST_STREAM, and the stream is gone."""
        self.out.append(frame(RST_STREAM, 0, st.sid, struct.pack(">L", code)))
        self.streams.pop(st.sid, None)
        self.blocked.discard(st)
        self._drop_buffer(st)
        st.finished = True
        self._reset_handler(st)

    def _deliver(self, st: _Stream, message: bytes) -> None:
        if st.finished or st.handler is None:
            return
        try:
            st.handler.on_message(message)
        except Exception as e:
            log.exception("handler error on stream %d", st.sid)
            self._refuse(st, INTERNAL, f"internal error: {type(e).__name__}")

    def _remote_end(self, st: _Stream) -> None:
        st.remote_closed = True
        if st.handler is not None and not st.finished:
            try:
                st.handler.on_end()
            except Exception as e:
                log.exception("handler error at end of stream %d", st.sid)
                self._refuse(st, INTERNAL, f"internal error: {type(e).__name__}")
        if st.finished and not st.pending:
            self.streams.pop(st.sid, None)
            if self.closing and not self.streams and self.transport is not None:
                self._flush()
                self.transport.close()

    def _reset_handler(self, st: _Stream) -> None:
        """Tell the handler its call is over without a normal end (once: it is then dropped)."""
        handler, st.handler = st.handler, None
        if handler is not None:
            try:
                handler.on_reset()
            except Exception:
                log.exception("handler error on reset of stream %d", st.sid)

    def _refuse(self, st: _Stream, status: int, message: str) -> None:
        """The server ends a call on its own (a limit, a handler error): the client gets the
        status, the handler a reset, so what it holds (a pick's in-flight count) is released."""
        st.finish(status, message)
        self._reset_handler(st)


def _check_settings(flags: int, sid: int, payload: bytes) -> None:
    if sid != 0:
        raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
    if flags & ACK and payload:
        raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
    if len(payload) % 6:
        raise ConnectionError_(FRAME_SIZE_ERROR, f"SETTINGS of {len(payload)} bytes")


def _check_ping(flags: int, sid: int, payload: bytes) -> None:
    if sid != 0:
        raise ConnectionError_(PROTOCOL_ERROR, "PING on a stream")
    if len(payload) != 8:
        raise ConnectionError_(FRAME_SIZE_ERROR, f"PING of {len(payload)} bytes")


def _check_window_update(flags: int, sid: int, payload: bytes) -> None:
    if len(payload) != 4:
        raise ConnectionError_(FRAME_SIZE_ERROR, f"WINDOW_UPDATE of {len(payload)} bytes")


def _check_rst(flags: int, sid: int, payload: bytes) -> None:
    if sid == 0:
        raise ConnectionError_(PROTOCOL_ERROR, "RST_STREAM on stream 0")
    if len(payload) != 4:
        raise ConnectionError_(FRAME_SIZE_ERROR, f"RST_STREAM of {len(payload)} bytes")


def _check_goaway(flags: int, sid: int, payload: bytes) -> None:
    if sid != 0:
        raise ConnectionError_(PROTOCOL_ERROR, "GOAWAY on a stream")
    if len(payload) < 8:
        raise ConnectionError_(FRAME_SIZE_ERROR, f"GOAWAY of {len(payload)} bytes")


def _check_on_stream(flags: int, sid: int, payload: bytes) -> None:
    if sid == 0:
        raise ConnectionError_(PROTOCOL_ERROR, "DATA, HEADERS or CONTINUATION on stream 0")


def _check_priority(flags: int, sid: int, payload: bytes) -> None:
    if sid == 0:
        raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
    if len(payload) != 5:
        raise ConnectionError_(FRAME_SIZE_ERROR, f"PRIORITY of {len(payload)} bytes")


# The RFC's per-type checks of stream id and length (sections 6.1-6.10), as a table.
_FRAME_CHECKS: dict[int, Callable[[int, int, bytes], None]] = {
    DATA: _check_on_stream, HEADERS: _check_on_stream, CONTINUATION: _check_on_stream,
    PRIORITY: _check_priority, RST_STREAM: _check_rst, SETTINGS: _check_settings, PING: _check_ping,
    GOAWAY: _check_goaway, WINDOW_UPDATE: _check_window_update,
}


class H2GrpcServer:
    """Listens on one port; routes each call by its :path to a handler factory."""

    def __init__(self, services: dict[str, HandlerFactory], limits: Limits | None = None) -> None:
        self.services = services
        self.limits = limits or Limits()
        self.activity = Activity()
        self._server: asyncio.Server | None = None
        self._conns: set[H2Connection] = set()
        self._idle = asyncio.Event()

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None, reuse_port: bool = False) -> int:
        """Listen; ``reuse_port``: several processes on one port (the kernel spreads connections)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._new_conn(), host, port, ssl=tls, reuse_address=True, reuse_port=reuse_port or None,
            backlog=1024)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    def _new_conn(self) -> H2Connection:
        conn = H2Connection(self.services, self.limits, self._closed, self.activity)
        self._conns.add(conn)
        return conn

    def _closed(self, conn: H2Connection) -> None:
        self._conns.discard(conn)
        if not self._conns:
            self._idle.set()

    def open_streams(self) -> int:
        return sum(len(c.streams) for c in self._conns)

    async def drain(self, timeout: float, quiet: float = 1.0) -> bool:
        """Keep serving, new streams included, until no stream is open and none has opened for
        ``quiet`` seconds (the gateway has moved on), or ``timeout``. True when it got quiet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if not self.open_streams() and time.monotonic() - self.activity.last_stream_at >= quiet:
                return True
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        return not self.open_streams()

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            self._server.close()
        if self._conns:
            self._idle.clear()
            for c in list(self._conns):
                c.goaway()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        for c in list(self._conns):
            if c.transport is not None:
                c.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()


def server_tls(key_pem: bytes, cert_pem: bytes, workdir: str) -> ssl.SSLContext:
    """A TLS context advertising h2 (ALPN), from PEM bytes."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_certificate(ctx, key_pem, cert_pem, workdir)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def load_certificate(ctx: ssl.SSLContext, key_pem: bytes, cert_pem: bytes, workdir: str) -> None:
    """Load (or replace: new handshakes use it) the context's key and certificate."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="epp-tls-", suffix=".pem", dir=workdir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem + b"\n" + cert_pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
