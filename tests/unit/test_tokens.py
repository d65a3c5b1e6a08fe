"""token-producer: the reference's backends (vllm render, estimate), epp's local tokenizer, the
cache, failures that let the request go on, and the config surface."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from epp.config import parse_config
from epp.request import InferenceRequest
from epp.requestcontrol.tokens import TokenCache, TokenProducer, estimate_bytes, pack_bytes, prompt_key
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError
from epp.sim.profiles import profile
from epp.sim.server import SimServer
from epp.sim.tokenizer import SimPromptTokenizer
from epp.stack.local import free_port

MODEL = "sim-model"


def producer(params: dict[str, Any]) -> TokenProducer:
    p = TokenProducer("token-producer", Params(params, "plugins[0].parameters"))
    p.load()
    return p


def chat(text: str, **extra: Any) -> InferenceRequest:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}
    return InferenceRequest("r1", "/v1/chat/completions", model=MODEL, body=body)


def completion(prompt: Any) -> InferenceRequest:
    return InferenceRequest("r2", "/v1/completions", model=MODEL, body={"model": MODEL, "prompt": prompt})


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    server = SimServer(free_port(), profile("fast"))
    await server.start()
    yield server
    await server.stop()


def expected_ids(body: dict[str, Any], chat_request: bool) -> list[int]:
    ids = SimPromptTokenizer().token_ids(body, chat_request)
    assert ids
    return ids


async def test_vllm_backend_takes_the_servers_own_render_and_caches_it(sim: SimServer) -> None:
    p = producer({"modelName": MODEL, "vllm": {"url": f"http://{sim.address}"}})
    r = chat("what is the capital of France?", max_tokens=5, temperature=0.3)
    fetch = p.prepare(r)
    assert fetch is not None and r.token_ids is None  # I/O: the director awaits it
    await fetch()
    assert r.token_ids == expected_ids(r.body or {}, True) and r.real_tokens
    assert sim.render_calls == 1
    again = chat("what is the capital of France?", max_tokens=50, stream=True)  # sampling differs only
    assert p.prepare(again) is None and again.token_ids == r.token_ids  # from the cache
    other = chat("what is the capital of Spain?")
    fetch = p.prepare(other)
    assert fetch is not None
    await fetch()
    assert other.token_ids != r.token_ids and sim.render_calls == 2
    c = completion("once upon a time")
    fetch = p.prepare(c)
    assert fetch is not None
    await fetch()
    assert c.token_ids == expected_ids(c.body or {}, False)
    assert p.counts == {"rendered": 3, "cached": 1}
    assert p.client is not None
    await p.client.close()


async def test_a_server_without_the_render_api_is_asked_its_tokenize(sim: SimServer) -> None:
    sim.render_api = False  # vllm serve without --enable-scale-out answers 403
    p = producer({"modelName": MODEL, "vllm": {"url": f"http://{sim.address}"}})
    r = chat("hello there")
    fetch = p.prepare(r)
    assert fetch is not None
    await fetch()
    assert r.token_ids == expected_ids(r.body or {}, True)
    assert p.client is not None and p.client.tokenize_only
    assert p.client is not None
    await p.client.close()


async def test_a_failing_or_slow_render_leaves_the_request_without_ids(sim: SimServer,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    down = producer({"modelName": MODEL, "vllm": {"url": f"http://127.0.0.1:{free_port()}"}})
    r = chat("hello")
    fetch = down.prepare(r)
    assert fetch is not None
    await fetch()
    assert r.token_ids is None and down.counts == {"failed": 1}
    assert "no token ids for request r1" in caplog.text
    sim.extra_latency_s = 0.5
    slow = producer({"modelName": MODEL, "vllm": {"url": f"http://{sim.address}", "timeout": "50ms"}})
    r = chat("hello")
    fetch = slow.prepare(r)
    assert fetch is not None
    t0 = asyncio.get_running_loop().time()
    await fetch()
    assert r.token_ids is None and asyncio.get_running_loop().time() - t0 < 0.4
    for p in (down, slow):
        assert p.client is not None
        await p.client.close()


def test_estimate_is_the_default_and_packs_four_bytes_a_token() -> None:
    p = producer({})
    assert p.backend == "estimate" and not p.real
    r = chat("abcdefgh")
    assert p.prepare(r) is None
    assert r.token_ids == pack_bytes(b"userabcdefgh") and len(r.token_ids) == 3 and not r.real_tokens
    assert pack_bytes(b"abcde") == [int.from_bytes(b"abcd", "little"), ord("e")]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert estimate_bytes({"messages": [], "tools": tools}, True).startswith(b'[{"type":"function"')
    assert estimate_bytes({"prompt": "xyz"}, False) == b"xyz"


def test_token_id_prompts_pass_through_whatever_the_backend() -> None:
    for params in ({}, {"tokenizer": "sim"}):
        p = producer(params)
        r = completion([5, 6, 7, 8])
        assert p.prepare(r) is None and r.token_ids == [5, 6, 7, 8] and r.real_tokens


def test_the_local_tokenizer_backend_needs_no_server() -> None:
    p = producer({"tokenizer": "sim"})
    r = chat("a local tokenizer")
    assert p.prepare(r) is None
    assert r.token_ids == expected_ids(r.body or {}, True) and r.real_tokens
    assert p.prepare(chat("a local tokenizer")) is None and p.counts == {"tokenized": 1, "cached": 1}


def test_the_cache_key_ignores_sampling_and_the_cache_is_bounded_in_tokens() -> None:
    assert prompt_key(chat("x", temperature=0.1)) == prompt_key(chat("x", temperature=0.9, stream=True))
    assert prompt_key(chat("x")) != prompt_key(chat("y"))
    assert prompt_key(chat("x")) != prompt_key(chat("x", tools=[{"type": "function"}]))
    assert prompt_key(chat("x")) != prompt_key(completion("x"))
    cache = TokenCache(10)
    cache.put(b"a", [1] * 6)
    cache.put(b"b", [2] * 4)
    assert cache.get(b"a") == [1] * 6  # now the most recent
    cache.put(b"c", [3] * 3)  # 13 > 10: the least recent ("b") goes
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.tokens == 9
    cache.put(b"big", [4] * 11)  # larger than the whole cache: not kept
    assert cache.get(b"big") is None and len(cache) == 2


@pytest.mark.parametrize(("params", "error"), [
    ({"estimate": {}, "modelName": "m"}, r"plugins\[0\]\.parameters: only one of 'estimate', 'vllm'"),
    ({"vllm": {"url": "http://x"}}, r"parameters\.modelName: required with vllm"),
    ({"modelName": "m", "vllm": {"url": "https://x"}}, r"vllm\.url: expected an http:// URL"),
    ({"modelName": "m", "vllm": {"timeout": "soon"}}, r"vllm\.timeout"),
    ({"modelName": "m", "vllm": {"grpc": {}}}, r"vllm\.grpc: unknown parameter"),
    ({"udsTokenizerConfig": {"socketFile": "/tmp/t.sock"}}, r"udsTokenizerConfig: not supported by epp"),
    ({"estimate": {"image": {"mode": "static"}}}, r"estimate\.image: not supported by epp \(multimodal"),
    ({"cacheSizeTokens": -1}, r"cacheSizeTokens: must be >= 0"),
])
def test_bad_parameters_name_the_field(params: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        TokenProducer("token-producer", Params(params, "plugins[0].parameters"))


def test_a_config_has_at_most_one_token_producer() -> None:
    text = """apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {name: a, type: token-producer}
- {name: b, type: token-producer}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
"""
    with pytest.raises(ConfigError, match=r"plugins\[1\]: a config has one token producer; 'a' is one"):
        parse_config(text)


async def test_a_render_answer_past_the_size_bound_is_a_failure_not_memory(
        sim: SimServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("epp.requestcontrol.tokens.MAX_RENDER_BYTES", 64)  # the sim's answer is larger
    p = producer({"modelName": MODEL, "vllm": {"url": f"http://{sim.address}"}})
    r = chat("a prompt long enough that its ids take more than sixty-four bytes of JSON")
    fetch = p.prepare(r)
    assert fetch is not None
    await fetch()
    assert r.token_ids is None and p.counts == {"failed": 1}
    await p.close()
