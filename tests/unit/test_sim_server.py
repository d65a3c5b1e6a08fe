"""The simulated server's HTTP API, metrics and admin controls (in-process, fast profile)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from epp.signals.mappings import VLLM
from epp.signals.promtext import parse_signals
from epp.sim.profiles import profile
from epp.sim.server import SimServer
from epp.stack.local import free_port

MODEL = "sim-model"


@pytest.fixture
async def sim() -> AsyncIterator[tuple[SimServer, aiohttp.ClientSession, str]]:
    server = SimServer(free_port(), profile("fast").with_overrides(lora_adapters=("sql-lora",)))
    await server.start()
    async with aiohttp.ClientSession() as session:
        yield server, session, f"http://{server.address}"
    await server.stop()


async def test_chat_completion_shape_and_cached_tokens(sim: tuple[SimServer, aiohttp.ClientSession, str]) -> None:
    server, s, base = sim
    body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me a story " * 20}], "max_tokens": 4,
            "ignore_eos": True}
    async with s.post(f"{base}/v1/chat/completions", json=body) as r:
        assert r.status == 200 and r.headers["x-sim-port"] == str(server.port)
        first = await r.json()
    assert first["object"] == "chat.completion"
    assert first["choices"][0]["message"]["role"] == "assistant"
    assert first["choices"][0]["finish_reason"] == "length"
    assert first["usage"]["completion_tokens"] == 4
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    async with s.post(f"{base}/v1/chat/completions", json=body) as r:
        second = await r.json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached % 16 == 0 and cached < second["usage"]["prompt_tokens"]


async def test_completions_with_text_and_token_ids(sim: tuple[SimServer, aiohttp.ClientSession, str]) -> None:
    _, s, base = sim
    async with s.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3, 4], "max_tokens": 2,
                                                      "ignore_eos": True}) as r:
        out = await r.json()
    assert out["object"] == "text_completion" and out["usage"]["prompt_tokens"] == 4
    async with s.post(f"{base}/v1/completions", json={"model": "sql-lora", "prompt": "select", "max_tokens": 2,
                                                      "min_tokens": 2}) as r:
        assert r.status == 200 and (await r.json())["model"] == "sql-lora"


async def test_streaming_chat_chunks_usage_and_done(sim: tuple[SimServer, aiohttp.ClientSession, str]) -> None:
    _, s, base = sim
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    async with s.post(f"{base}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:-1]] == [None, None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert len(text.split()) == 3
    # Without include_usage there is no usage chunk.
    body["stream_options"] = {}
    async with s.post(f"{base}/v1/chat/completions", json=body) as r:
        raw = (await r.read()).decode()
    assert '"usage"' not in raw


async def test_stream_sends_each_token_when_made() -> None:
    """The first token is on the wire before the next is computed (no chunk waits a decode step to
    learn whether it is the last), and the last one carries the finish reason."""
    server = SimServer(free_port(), profile("fast").with_overrides(decode_base_s=2.0))
    await server.start()
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as s, s.post(f"http://{server.address}/v1/completions", json=body) as r:
            first = orjson.loads((await r.content.readuntil(b"\n\n"))[6:])
            made = server.engine.stats.generation_tokens
            rest = [e[6:] for e in (await r.read()).split(b"\n\n") if e]
    finally:
        await server.stop()
    assert first["choices"][0]["text"] and first["choices"][0]["finish_reason"] is None
    assert made == 1  # read while the second token's 2 s decode step was still running
    assert orjson.loads(rest[0])["choices"][0]["finish_reason"] == "length" and rest[-1] == b"[DONE]"


async def test_errors_in_vllm_shape(sim: tuple[SimServer, aiohttp.ClientSession, str]) -> None:
    _, s, base = sim
    async with s.post(f"{base}/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                                                                                          "content": "x"}]}) as r:
        assert r.status == 404
        err = (await r.json())["error"]
        assert err["type"] == "NotFoundError" and err["code"] == 404 and "nope" in err["message"]
    async with s.post(f"{base}/v1/completions", data=b"{not json") as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "BadRequestError"
    async with s.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10**9}) as r:
        assert r.status == 400 and "maximum context length" in (await r.json())["error"]["message"]


async def test_models_health_tokenize(sim: tuple[SimServer, aiohttp.ClientSession, str]) -> None:
    _, s, base = sim
    async with s.get(f"{base}/v1/models") as r:
        ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == [MODEL, "sql-lora"]
    async with s.get(f"{base}/health") as r:
        assert r.status == 200
    async with s.post(f"{base}/tokenize", json={"model": MODEL, "prompt": "hello world"}) as r:
        tok = await r.json()
    assert tok["count"] == len(tok["tokens"]) == 4  # "hell" "o" " wor" "ld"


async def test_metrics_have_vllm_names_and_admin_pins(sim: tuple[SimServer, aiohttp.ClientSession, str]) -> None:
    _, s, base = sim
    async with s.get(f"{base}/metrics") as r:
        text = await r.text()
    sig = parse_signals(text, VLLM)
    assert sig.block_size == 16 and sig.num_gpu_blocks == 4096
    assert 'vllm:lora_requests_info{max_lora="4"' in text
    async with s.post(f"{base}/admin", json={"pin": {"num_requests_waiting": 42, "kv_cache_usage_perc": 0.7}}) as r:
        assert r.status == 200
    async with s.get(f"{base}/metrics") as r:
        sig = parse_signals(await r.text(), VLLM)
    assert (sig.waiting, sig.kv_usage) == (42, 0.7)
    async with s.post(f"{base}/admin", json={"pin": {"bogus": 1}}) as r:
        assert r.status == 400


async def test_admin_metrics_fail_and_hang(sim: tuple[SimServer, aiohttp.ClientSession, str]) -> None:
    _, s, base = sim
    await (await s.post(f"{base}/admin", json={"metrics": "fail"})).read()
    async with s.get(f"{base}/metrics") as r:
        assert r.status == 500
    await (await s.post(f"{base}/admin", json={"metrics": "hang"})).read()
    with pytest.raises(asyncio.TimeoutError):
        async with s.get(f"{base}/metrics", timeout=aiohttp.ClientTimeout(total=0.3)) as r:
            await r.read()
    await (await s.post(f"{base}/admin", json={"metrics": "ok"})).read()
    async with s.get(f"{base}/metrics") as r:
        assert r.status == 200


async def test_admin_extra_latency(sim: tuple[SimServer, aiohttp.ClientSession, str]) -> None:
    _, s, base = sim
    await (await s.post(f"{base}/admin", json={"extra_latency_ms": 300})).read()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with s.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}) as r:
        assert r.status == 200
    assert loop.time() - t0 >= 0.3


async def test_drain_and_crash_and_restart(sim: tuple[SimServer, aiohttp.ClientSession, str]) -> None:
    _, s, base = sim
    await (await s.post(f"{base}/admin", json={"drain": True})).read()
    async with s.get(f"{base}/health") as r:
        assert r.status == 503
    async with s.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x"}) as r:
        assert r.status == 503
    await (await s.post(f"{base}/admin", json={"drain": False, "crash_for_s": 0.3})).read()
    await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectionError):
            await fresh.get(f"{base}/health")
        await asyncio.sleep(0.5)
        async with fresh.get(f"{base}/health") as r:
            assert r.status == 200


async def test_request_log_records_body_hash(sim: tuple[SimServer, aiohttp.ClientSession, str]) -> None:
    _, s, base = sim
    body = orjson.dumps({"model": MODEL, "prompt": "integrity check", "max_tokens": 1})
    async with s.post(f"{base}/v1/completions", data=body, headers={"x-test-id": "t1"}) as r:
        await r.read()
    async with s.get(f"{base}/admin/requests") as r:
        log = await r.json()
    assert log[-1]["sha256"] == hashlib.sha256(body).hexdigest() and log[-1]["body_len"] == len(body)
    assert log[-1]["headers"]["x-test-id"] == "t1"


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


async def test_fast_metrics_equal_prometheus_clients_rendering(
        sim: tuple[SimServer, aiohttp.ClientSession, str]) -> None:
    server, session, url = sim
    server.metrics.mirror_to_reference()
    model = server.params.names()[0]
    for i in range(3):  # fill histograms and counters
        async with session.post(f"{url}/v1/completions",
                                json={"model": model, "prompt": f"hello {i} " * 30, "max_tokens": 4}) as r:
            assert r.status == 200
    await session.post(f"{url}/admin", json={"pin": {"num_requests_waiting": 7}})
    fast = server.metrics.render()
    reference = server.metrics.reference_exposition()
    got, want = _samples(fast), _samples(reference)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert got[("vllm:num_requests_waiting", (("engine", "0"), ("model_name", model)))] == 7
    assert got[("vllm:time_to_first_token_seconds_count", (("engine", "0"), ("model_name", model)))] == 3
    async with session.get(f"{url}/metrics") as r:
        assert (await r.read()).startswith(b"# HELP vllm:time_to_first_token_seconds")
