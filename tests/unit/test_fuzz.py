"""Seeded fuzzing of what faces untrusted bytes: the HTTP/2 server with the real services behind
it, the ext_proc state machine, the config parser and the metrics reader.

``EPP_FUZZ_SCALE`` multiplies the case counts: the default suite runs 11,200 protocol cases (5,000
ext_proc streams, 6,200 HTTP/2 connections) and 3,000 config and metrics cases; ``make fuzz`` runs
ten times as many. A failure names the seed that reproduces it.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hpack import Encoder

from epp.config import DEFAULT_CONFIG, parse_config
from epp.datastore.endpoint import EngineSignals
from epp.datastore.store import Datastore
from epp.observability.metrics import PickerMetrics
from epp.requestcontrol.director import Director
from epp.scheduling.types import ConfigError
from epp.server import h2grpc as h2
from epp.server.extproc import ExtProcStream, OutOfOrder
from epp.server.extproc import h2_services as extproc_services
from epp.server.health import HealthState, _Watch
from epp.server.pickapi import PickAPI
from epp.signals.httpget import HTTPGetError, _Conn
from epp.signals.mappings import VLLM
from epp.signals.promtext import MAX_QUEUE, parse_signals
from epp.v1 import picker_pb2
from tests.fakes import FakeTransport

SCALE = int(os.environ.get("EPP_FUZZ_SCALE", "1"))
FIXTURE = Path(__file__).parent.parent / "fixtures" / "vllm-0.32" / "metrics.txt"


class Recorder(logging.Handler):
    """Collects log records that carry a traceback: each is a case the code did not expect."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.failures: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None:
            self.failures.append(f"{record.name}: {record.getMessage()}: {record.exc_info[1]!r}")


@pytest.fixture
def unexpected() -> Iterator[Recorder]:
    rec = Recorder()
    root = logging.getLogger()
    root.addHandler(rec)
    try:
        yield rec
    finally:
        root.removeHandler(rec)


def picks() -> Director:
    store = Datastore()
    addrs = ["10.0.0.1:8000", "10.0.0.2:8000"]
    store.set_endpoints(addrs)
    for a in addrs:
        store.record_scrape(a, EngineSignals(), 0)
    scheduler, _ = parse_config(DEFAULT_CONFIG).build()
    return Director(store, scheduler, PickerMetrics(store))


# -- ext_proc messages -----------------------------------------------------------------------------

PATHS = ["/v1/completions", "/v1/chat/completions", "//v1/completions", "/V1/Chat/Completions", "/v1/models",
         "/v1/completions?x=1", "", "/", "/v1/embeddings", "/" + "a" * 300]
BODIES = [
    orjson.dumps({"model": "m", "prompt": "hello " * 20}),
    orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}),
    orjson.dumps({"model": "m", "messages": 42}),
    orjson.dumps({"model": "", "prompt": "x"}),
    orjson.dumps({"model": ["m"], "prompt": "x"}),
    orjson.dumps([1, 2, 3]),
    orjson.dumps({"model": "m", "prompt": [[1, 2], [3]]}),
    orjson.dumps({"model": "m", "prompt": {"a": 1}}),
    b"", b"{", b"\xff\xfe\x00", b"null", b'{"model": "m", "prompt": "\\ud800"}',
]
MODES = [0, 1, 2, 3, 4, 5, 42]


def random_headers(rng: random.Random) -> pb.HttpHeaders:
    h = pb.HttpHeaders(end_of_stream=rng.random() < 0.2)
    pairs = [(":path", rng.choice(PATHS)), (":method", rng.choice(["POST", "GET", "post", ""]))]
    for key, value in (("content-length", rng.choice(["0", "12", "abc", ""])), ("x-request-id", "r"),
                       ("x-gateway-inference-objective", "obj"), ("x-gateway-model-name", "m")):
        if rng.random() < 0.3:
            pairs.append((key, value))
    for k, v in pairs:
        if rng.random() < 0.5:
            h.headers.headers.add(key=k, raw_value=v.encode())
        else:
            h.headers.headers.add(key=k, value=v)
    return h


def random_message(rng: random.Random) -> pb.ProcessingRequest:
    kind = rng.choice(["request_headers", "request_headers", "request_body", "request_body", "request_trailers",
                       "response_headers", "response_body", "response_body", "response_trailers", "empty"])
    if kind == "request_headers":
        msg = pb.ProcessingRequest(request_headers=random_headers(rng))
        if rng.random() < 0.9:
            msg.protocol_config.request_body_mode = rng.choice(MODES)  # type: ignore[assignment]
            msg.protocol_config.response_body_mode = rng.choice(MODES)  # type: ignore[assignment]
        return msg
    if kind in ("request_body", "response_body"):
        data = rng.choice(BODIES)
        if rng.random() < 0.3 and data:
            cut = rng.randrange(len(data))
            data = data[:cut] if rng.random() < 0.5 else data[cut:]
        body = pb.HttpBody(body=data, end_of_stream=rng.random() < 0.5)
        return pb.ProcessingRequest(**{kind: body})
    if kind in ("request_trailers", "response_trailers"):
        return pb.ProcessingRequest(**{kind: pb.HttpTrailers()})
    if kind == "response_headers":
        return pb.ProcessingRequest(response_headers=pb.HttpHeaders(end_of_stream=rng.random() < 0.2))
    return pb.ProcessingRequest()


def test_ext_proc_state_machine(unexpected: Recorder) -> None:
    service = picks()
    cases = 5000 * SCALE
    for seed in range(cases):
        rng = random.Random(seed)
        stream = ExtProcStream(service, decision_headers=rng.random() < 0.3, max_body=rng.choice([64, 1 << 20]))
        answered_request = False
        for _ in range(rng.randint(1, 8)):
            msg = random_message(rng)
            try:
                answers = stream.on_message(msg)
            except OutOfOrder:  # the adapter ends the stream with INVALID_ARGUMENT
                break
            for out in answers:
                resp = pb.ProcessingResponse.FromString(out)  # every answer is a valid message
                kind = resp.WhichOneof("response")
                assert kind is not None, seed
                answered_request |= kind in ("request_headers", "request_body", "immediate_response")
            ended = (msg.WhichOneof("request") == "request_body" and msg.request_body.end_of_stream
                     and stream._req_mode in (2, 3, 4))
            if ended:  # the request side is complete: Envoy must have an answer to go on with
                assert answered_request, f"seed {seed}: no answer after the request body's end"
        stream.close()
        assert sum(service.store.inflight.values()) == 0, f"seed {seed}: a pick was not released"
    assert not unexpected.failures, unexpected.failures[:5]


# -- HTTP/2 frames ----------------------------------------------------------------------------------

def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


METHODS = ["/envoy.service.ext_proc.v3.ExternalProcessor/Process", "/epp.v1.EndpointPicker/Pick",
           "/epp.v1.EndpointPicker/Release", "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
           "/nope/X"]


def valid_session(rng: random.Random, enc: Encoder) -> list[bytes]:
    frames = [h2.frame(h2.SETTINGS, 0, 0, struct.pack(">HL", h2.SETTINGS_INITIAL_WINDOW_SIZE,
                                                       rng.choice([0, 100, 65535, 1 << 20])))]
    sid = 1
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(METHODS)
        block = enc.encode([(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "epp"),
                            ("content-type", "application/grpc"), ("te", "trailers")])
        frames.append(h2.frame(h2.HEADERS, h2.END_HEADERS, sid, block))
        if "Process" in path:
            messages = [random_message(rng).SerializeToString() for _ in range(rng.randint(1, 4))]
        elif "Pick" in path:
            messages = [picker_pb2.PickRequest(model="m", prompt="p" * rng.randint(0, 100)).SerializeToString()]
        elif "Release" in path:
            messages = [picker_pb2.ReleaseRequest(pick_id="x").SerializeToString()]
        else:
            messages = [b"\x0a\x09readiness"]
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            frames.append(h2.frame(h2.DATA, h2.END_STREAM if last and rng.random() < 0.8 else 0, sid,
                                   grpc_message(m)))
        sid += 2
    frames.append(h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">L", 1 << 20)))
    return frames


def mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    for _ in range(rng.randint(0, 3)):
        op = rng.randrange(7)
        i = rng.randrange(len(frames))
        if op == 0:
            del frames[i]
        elif op == 1:
            frames.insert(i, frames[i])
        elif op == 2 and frames[i]:
            b = bytearray(frames[i])
            b[rng.randrange(len(b))] = rng.randrange(256)
            frames[i] = bytes(b)
        elif op == 3:
            frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
        elif op == 4:
            payload = rng.randbytes(rng.choice([0, 1, 2, 4, 5, 6, 8, 9, 20, 100]))
            frames.insert(i, h2.frame(rng.randrange(12), rng.randrange(256), rng.choice([0, 1, 2, 3, 5, 2**31 - 1]),
                                      payload))
        elif op == 5:
            j = rng.randrange(len(frames))
            frames[i], frames[j] = frames[j], frames[i]
        else:
            frames.insert(i, h2.frame(h2.CONTINUATION, rng.choice([0, h2.END_HEADERS]), 1, rng.randbytes(30)))
    return frames


def run_connection(rng: random.Random, services: dict[str, h2.HandlerFactory], limits: h2.Limits) -> h2.H2Connection:
    conn = h2.H2Connection(services, limits, lambda c: None)
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    data = h2.PREFACE + b"".join(mutate(rng, valid_session(rng, Encoder())))
    if rng.random() < 0.05:
        data = rng.randbytes(rng.randint(0, 200))
    pos = 0
    while pos < len(data) and not t.closed:  # delivered in random pieces, as TCP may
        step = rng.randint(1, 400)
        conn.data_received(data[pos : pos + step])
        pos += step
    if not t.closed:
        for st in conn.streams.values():  # nothing the client finished is left unanswered
            waiting = st.pending or st.trailer is not None  # held by the client's flow-control window
            assert not st.remote_closed or waiting or isinstance(st.handler, _Watch), \
                f"stream {st.sid} ended by the client but not answered"
    conn.connection_lost(None)
    return conn


def test_http2_server_with_the_real_services(unexpected: Recorder) -> None:
    service = picks()
    health = HealthState()
    health.set("readiness", 1)
    api = PickAPI(service, ttl=0.0)  # unreleased picks expire at the next pick: memory must come back
    services = {**extproc_services(lambda: ExtProcStream(service)), **api.h2_services(), **health.h2_services()}
    limits = h2.Limits(max_message=64 * 1024, max_header_block=4096, max_buffered=128 * 1024)
    cases = 5000 * SCALE
    for seed in range(cases):
        conn = run_connection(random.Random(seed), services, limits)
        assert not conn.streams and conn.buffered == 0, seed
    tracemalloc.start()  # then memory, over more connections (tracing is slow: fewer of them)
    epp_log = logging.getLogger("epp")
    level = epp_log.level
    epp_log.setLevel(logging.ERROR)  # pytest keeps every record it captures, with epp's strings in it
    try:
        for seed in range(cases, cases + 200):  # warm-up: caches and interned strings settle
            run_connection(random.Random(seed), services, limits)
        baseline = _epp_memory()
        traced = 1000 * SCALE
        for seed in range(cases + 200, cases + 200 + traced):
            run_connection(random.Random(seed), services, limits)
        grown = _epp_memory() - baseline
    finally:
        tracemalloc.stop()
        epp_log.setLevel(level)
    assert health.watched() == 0
    assert sum(service.store.inflight.values()) == api.outstanding  # unreleased picks wait for their TTL
    assert grown < 256 * 1024, f"epp's memory grew by {grown} bytes over {traced} connections"
    assert not unexpected.failures, unexpected.failures[:5]


def _epp_memory() -> int:
    """Bytes allocated by epp's own code and still reachable (not the test's log capture)."""
    gc.collect()  # connections, streams and exceptions form cycles: count only what is really kept
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/epp/*")])
    return sum(stat.size for stat in snap.statistics("filename"))


# -- config -----------------------------------------------------------------------------------------

VALUES: list[Any] = [None, 0, -1, 1e400, float("nan"), "x", [], {}, ["x"], [[1]], {"a": 1}, True, 10**30, 1.5,
                     {1: 2}, "y" * 5000]
BASES = [yaml.safe_load(DEFAULT_CONFIG), yaml.safe_load("""
plugins:
- {type: queue-scorer}
- {type: prefill-load-scorer, parameters: {scaleTokens: 512, interference: 2}}
- {type: prefix-cache-scorer, parameters: {blockSizeTokens: 16, balanceAbsThreshold: 2}}
- {type: weighted-random-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- name: p
  plugins:
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: prefill-load-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: weighted-random-picker}
saturationDetector: {queueDepthThreshold: 10, kvCacheUtilThreshold: 0.9}
""")]


def _mutate_doc(rng: random.Random, node: Any) -> Any:
    if isinstance(node, dict) and node and rng.random() < 0.75:
        node = dict(node)
        k = rng.choice(list(node))
        if rng.random() < 0.1:
            node[rng.choice(["extra", 1, "weight"])] = rng.choice(VALUES)
        else:
            node[k] = _mutate_doc(rng, node[k])
        return node
    if isinstance(node, list) and node and rng.random() < 0.75:
        node = list(node)
        i = rng.randrange(len(node))
        node[i] = _mutate_doc(rng, node[i])
        return node
    return rng.choice(VALUES)


def _mutate_text(rng: random.Random, text: str) -> bytes:
    data = bytearray(text.encode())
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data) + 1)
        op = rng.randrange(4)
        if op == 0:
            data[i:i] = rng.choice([b"[", b"{", b":", b"- ", b"\t", b"&a", b"*a", b"!!python/object:x", b"\xff",
                                    b"\x00", b"'", b"\n  ", b"? "])
        elif op == 1 and data:
            del data[i : i + rng.randint(1, 20)]
        elif op == 2:
            data[i:i] = rng.randbytes(rng.randint(1, 8))
        else:
            data[i:i] = b"[" * rng.randint(100, 3000)
    return bytes(data)


def test_config_parser_mutations(unexpected: Recorder) -> None:
    unclear = []
    for seed in range(1000 * SCALE):
        rng = random.Random(seed)
        base = rng.choice(BASES)
        if rng.random() < 0.6:
            text: str | bytes = yaml.safe_dump(_mutate_doc(rng, base), allow_unicode=True)
        else:
            text = _mutate_text(rng, yaml.safe_dump(base))
        try:
            parse_config(text, "f.yaml")
        except ConfigError as e:
            message = str(e)
            assert message.startswith("f.yaml: ") and "\n" not in message and len(message) < 2000, (seed, message)
            if "cannot be read (" in message:  # the safety net caught what the checks missed
                unclear.append((seed, message))
    assert not unclear, unclear[:5]
    assert not unexpected.failures, unexpected.failures[:5]


# -- metrics reader ---------------------------------------------------------------------------------

GARBAGE_VALUES = ["NaN", "+Inf", "-Inf", "-1", "1e400", "abc", "", "1e9", "0x10", "--1", "1_0", "nan"]


def _mutate_exposition(rng: random.Random, lines: list[str]) -> str:
    lines = list(lines)
    for _ in range(rng.randint(1, 5)):
        i = rng.randrange(len(lines))
        op = rng.randrange(6)
        if op == 0:
            del lines[i]
        elif op == 1 and " " in lines[i]:
            lines[i] = lines[i].rsplit(" ", 1)[0] + " " + rng.choice(GARBAGE_VALUES)
        elif op == 2:
            lines[i] = lines[i].replace("{", "", 1) if rng.random() < 0.5 else lines[i].replace("}", "{", 1)
        elif op == 3:
            lines.insert(i, rng.choice(lines) + rng.choice(["", " 1", "{", '"']))
        elif op == 4:
            lines[i] = rng.randbytes(rng.randint(1, 40)).decode("latin-1")
        else:
            lines.insert(i, "vllm:num_requests_waiting" + rng.choice(['{a="', "{", " ", "_x 1"]))
    return "\n".join(lines)


def test_metrics_reader_garbage(unexpected: Recorder) -> None:
    lines = [ln for ln in FIXTURE.read_text().splitlines() if ln.startswith(("vllm:num_requests", "vllm:kv_cache",
                                                                               "vllm:cache_config", "vllm:lora",
                                                                               "vllm:prefix_cache", "# "))]
    accepted = 0
    for seed in range(1000 * SCALE):
        rng = random.Random(seed)
        text = _mutate_exposition(rng, lines)
        try:
            sig = parse_signals(text, VLLM)
        except ValueError:
            continue  # ParseError and friends: the scraper marks the pod failing with this reason
        accepted += 1
        assert 0 <= sig.waiting <= MAX_QUEUE and 0 <= sig.running <= MAX_QUEUE and 0 <= sig.kv_usage <= 1, seed
    assert accepted > 0  # some mutations are harmless (a dropped comment)
    for seed in range(1000 * SCALE):
        rng = random.Random(seed)
        conn = _Conn(max_body=4096)
        t = FakeTransport()
        conn.connection_made(t)  # type: ignore[arg-type]
        import asyncio

        loop = asyncio.new_event_loop()
        try:
            conn.waiter = loop.create_future()
            body = _mutate_exposition(rng, lines[:20]).encode("utf-8", "surrogateescape")
            head = rng.choice([b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n",
                               b"HTTP/1.0 500 X\r\n", b"ICY 200 OK\r\n", b"HTTP/1.1 2000\r\n", b""])
            framing = rng.randrange(3)
            if framing == 0:
                raw = head + b"Content-Length: " + str(len(body) + rng.randint(-3, 3)).encode() + b"\r\n\r\n" + body
            elif framing == 1:
                raw = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
                if rng.random() < 0.5:
                    raw = raw.replace(b"\r\n", b"\n", rng.randint(1, 3))
            else:
                raw = rng.randbytes(rng.randint(0, 300))
            pos = 0
            while pos < len(raw) and not t.closed:
                step = rng.randint(1, 300)
                conn.data_received(raw[pos : pos + step])  # never raises
                pos += step
            if conn.waiter.done():
                exc = conn.waiter.exception()
                assert exc is None or isinstance(exc, HTTPGetError), (seed, exc)
                if exc is None:
                    status, got = conn.waiter.result()
                    assert isinstance(status, int) and len(got) <= 4096
            assert len(conn.buf) <= 4096 + 64 * 1024
        finally:
            loop.close()
    assert not unexpected.failures, unexpected.failures[:5]
