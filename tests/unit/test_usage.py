"""Reading cached_tokens from responses, and removing the usage event epp asked for."""

from __future__ import annotations

import orjson

from epp.request import InferenceRequest
from epp.requestcontrol.parsing import mutated_body, parse_body
from epp.requestcontrol.usage import UsageReader, wants_injection


def event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


CHUNK = event({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]})
USAGE = event({"id": "c", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 90, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 64}}})
DONE = b"data: [DONE]\n\n"


def run(reader: UsageReader, pieces: list[bytes]) -> bytes:
    out = [reader.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return b"".join(out)


def test_injected_usage_is_read_and_removed_wherever_the_chunks_split() -> None:
    stream = CHUNK + CHUNK + USAGE + DONE
    for cut in range(1, len(stream)):
        reader = UsageReader(strip=True)
        out = run(reader, [stream[:cut], stream[cut:], b""])
        assert out == CHUNK + CHUNK + DONE, cut
        assert reader.cached_tokens == 64


def test_whole_events_pass_at_once_and_a_partial_one_waits_for_its_end() -> None:
    reader = UsageReader(strip=True)
    assert reader.feed(CHUNK, False) == CHUNK
    assert reader.feed(CHUNK[:10], False) == b""
    assert reader.feed(CHUNK[10:] + USAGE[:5], False) == CHUNK
    assert reader.feed(USAGE[5:] + DONE, False) == DONE
    assert reader.feed(b"", True) == b""


def test_usage_the_client_asked_for_passes_through() -> None:
    reader = UsageReader(strip=False)
    stream = CHUNK + USAGE + DONE
    assert run(reader, [stream[:7], stream[7:], b""]) == stream
    assert reader.cached_tokens == 64
    body = orjson.dumps({"id": "x", "choices": [{"message": {"content": "a" * 20000}}],
                         "usage": {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 32}}})
    plain = UsageReader(strip=False)
    assert run(plain, [body[:9000], body[9000:], b""]) == body and plain.cached_tokens == 32
    none = UsageReader(strip=False)
    run(none, [orjson.dumps({"usage": {"prompt_tokens": 5, "prompt_tokens_details": None}}), b""])
    assert none.cached_tokens is None


def test_injection_only_for_streams_without_usage() -> None:
    def req(**body: object) -> InferenceRequest:
        return parse_body("r", "/v1/chat/completions", {}, orjson.dumps({"model": "m", "messages": [], **body}))

    assert wants_injection(req(stream=True))
    assert wants_injection(req(stream=True, stream_options={"continuous_usage_stats": False}))
    assert not wants_injection(req(stream=True, stream_options={"include_usage": True}))
    assert not wants_injection(req())
    r = req(stream=True, stream_options={"x": 1})
    assert mutated_body(r) is None  # nothing to change: the client's bytes go through
    out = orjson.loads(mutated_body(r, include_usage=True) or b"")
    assert out["stream_options"] == {"x": 1, "include_usage": True} and out["model"] == "m"
    r.target_model = "m-v2"
    assert orjson.loads(mutated_body(r) or b"")["model"] == "m-v2"
