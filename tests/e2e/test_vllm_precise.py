"""Precise prefix routing against two real vLLM servers (real-vLLM suite; needs EPP_VLLM_PYTHON).

Two vLLM 0.32 servers (tiny model made offline, prefix caching, 48 blocks of 32 tokens, KV events
over ipc, prompt-token details), epp in this process with the precise scorer on the model's own
tokenizer directory, a real Envoy in front. Proves: the scrape reads real values; epp tokenizes
like vLLM; the index holds exactly the block keys vLLM publishes; shared-prefix requests land
where their blocks are and vLLM reports the cached tokens epp predicted; streams keep the shape
the client asked for; a reset_prefix_cache is seen; the token-producer gets vLLM's own ids from
its render API (first server, --enable-scale-out) or its /tokenize (second server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

from epp.blockhash import block_hashes
from epp.config import parse_config, precise_config
from epp.request import InferenceRequest
from epp.requestcontrol.tokens import TokenProducer
from epp.scheduling.params import Params
from epp.scheduling.precise_scorer import PrecisePrefixCacheScorer
from epp.server.app import PickerServer, ServeOptions
from epp.stack.local import free_ports, start_envoy, wait_until
from epp.tokenization import HFPromptTokenizer
from tests.e2e import vllm_fixture

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
VLLM_PYTHON = os.environ.get("EPP_VLLM_PYTHON")
JSON = {"content-type": "application/json"}
SHARED = "You are the archivist of a small library. Every answer names the shelf and the row. " * 12


@dataclass
class RealFleet:
    model: Path
    kv_dir: Path
    addresses: list[str]


def _post(url: str, body: dict[str, object]) -> dict[str, object]:
    return vllm_fixture.post(url, body)


@pytest.fixture(scope="module")
def real_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealFleet]:
    if not VLLM_PYTHON:
        pytest.skip("EPP_VLLM_PYTHON not set (real-vLLM suite only)")
    work = tmp_path_factory.mktemp("vllm")
    model = work / "tiny-llama"
    script = Path(vllm_fixture.__file__)
    subprocess.run([VLLM_PYTHON, str(script), "--make-model", str(model)], check=True, capture_output=True,
                   timeout=300)
    kv_dir = work / "kv"
    kv_dir.mkdir()
    procs, addresses, logs = [], [], []
    try:
        for core, port in enumerate(free_ports(2)):
            kv = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"ipc://{kv_dir}/kv-{port}.sock",
                  "replay_endpoint": f"ipc://{kv_dir}/replay-{port}.sock", "topic": "kv-events"}
            d = work / f"server-{port}"
            d.mkdir()
            log = d / "vllm.log"
            out = open(log, "wb")  # noqa: SIM115 - the child writes to it
            extra = ("--enable-scale-out",) if core == 0 else ()  # the render API on the first server only
            procs.append(subprocess.Popen(vllm_fixture.server_command(VLLM_PYTHON, model, port, kv, extra),
                                          env=vllm_fixture.server_env(d, core), stdout=out, stderr=subprocess.STDOUT))
            addresses.append(f"127.0.0.1:{port}")
            logs.append(log)
        t0 = time.time()
        for addr, proc, log in zip(addresses, procs, logs, strict=True):
            vllm_fixture.wait_healthy(f"http://{addr}", proc, log)
        print(f"\n2 vLLM servers healthy in {time.time() - t0:.0f}s", file=sys.stderr)
        yield RealFleet(model, kv_dir, addresses)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_epp_tokenizes_like_vllm(real_fleet: RealFleet) -> None:
    tok = HFPromptTokenizer(str(real_fleet.model))
    base = f"http://{real_fleet.addresses[0]}"
    messages = [{"role": "system", "content": SHARED}, {"role": "user", "content": "Where is Moby Dick?"}]
    theirs = _post(base + "/tokenize", {"model": "tiny", "messages": messages, "add_generation_prompt": True})
    assert tok.token_ids({"messages": messages}, chat=True) == theirs["tokens"]
    prompt = SHARED + " and a completion prompt"
    theirs = _post(base + "/tokenize", {"model": "tiny", "prompt": prompt})
    assert tok.token_ids({"prompt": prompt}, chat=False) == theirs["tokens"]


async def test_the_token_producer_takes_the_servers_render_or_else_its_tokenize(real_fleet: RealFleet) -> None:
    """The reference's vllm backend against real servers: /v1/*/render where it is enabled, /tokenize
    where vllm serve answers 403; either way the ids are the ones vLLM computes (and hashes)."""
    tok = HFPromptTokenizer(str(real_fleet.model))
    messages = [{"role": "system", "content": SHARED}, {"role": "user", "content": "Where is Dracula?"}]
    bodies = [("/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 4}),
              ("/v1/completions", {"model": "tiny", "prompt": SHARED + " and a completion", "max_tokens": 4})]
    for addr, render_api in zip(real_fleet.addresses, (True, False), strict=True):
        p = TokenProducer("token-producer", Params({"modelName": "tiny", "vllm": {"url": f"http://{addr}"}}, "t"))
        try:
            for path, body in bodies:
                r = InferenceRequest("x", path, model="tiny", body=body)
                fetch = p.prepare(r)
                assert fetch is not None
                await fetch()
                assert r.token_ids == tok.token_ids(body, chat=r.chat) and r.real_tokens, (addr, path)
            assert p.client is not None and p.client.tokenize_only is not render_api
            assert p.counts == {"rendered": 2}
            # Anthropic Messages: vLLM renders them as the same chat (only where the render API is on).
            anthropic = {"model": "tiny", "max_tokens": 4, "system": SHARED,
                         "messages": [{"role": "user", "content": [{"type": "text", "text": "Where is Dracula?"}]}]}
            r = InferenceRequest("x", "/v1/messages", model="tiny", body=anthropic, api="messages")
            fetch = p.prepare(r)
            assert fetch is not None
            await fetch()
            if render_api:
                assert r.token_ids == tok.token_ids({"messages": messages}, chat=True)
            else:
                assert r.token_ids is None and p.counts["failed"] == 1
        finally:
            await p.close()


def config(fleet: RealFleet) -> str:
    return precise_config(str(fleet.model), f"ipc://{fleet.kv_dir}/kv-{{port}}.sock",
                          f"ipc://{fleet.kv_dir}/replay-{{port}}.sock", "kv-events")


def chat(question: str, **extra: object) -> bytes:
    return orjson.dumps({"model": "tiny", "max_tokens": 4, "ignore_eos": True,
                         "messages": [{"role": "system", "content": SHARED}, {"role": "user", "content": question}],
                         **extra})


@pytest.mark.timeout(600)
async def test_precise_routing_and_the_closed_loop_on_real_vllm(real_fleet: RealFleet, tmp_path: Path) -> None:
    ports = free_ports(3)
    cfg = parse_config(config(real_fleet), "e2e")
    picker = PickerServer(ServeOptions(config=cfg, endpoints=tuple(real_fleet.addresses), host="127.0.0.1",
                                       grpc_port=ports[0], grpc_health_port=ports[1], metrics_port=ports[2],
                                       secure_serving=False, decision_headers=True, refresh_metrics_interval=0.1))
    await picker.start()
    envoy = None
    try:
        async def ready() -> bool:
            return picker.store.fresh_count() == 2 and len(picker.kv_events.subscribers) == 2

        await wait_until(ready, 30, "fresh metrics and KV subscribers")
        # The scrape reads the real server's values.
        for addr in real_fleet.addresses:
            st = picker.store.get(addr)
            assert st is not None and st.signals is not None
            assert (st.signals.block_size, st.signals.num_gpu_blocks) == (32, 48)
        envoy = await start_envoy("epp-full-duplex", tmp_path, epp_port=picker.bound_ports["grpc"])
        sc = next(s for s, _ in picker.director.scheduler.profile.scorers if isinstance(s, PrecisePrefixCacheScorer))
        warm = real_fleet.addresses[1]
        # A client talks to one server directly: epp did not route it, the events tell.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            first = chat("Where is Moby Dick?")
            async with s.post(f"http://{warm}/v1/chat/completions", data=first,
                              headers=JSON) as r:
                assert r.status == 200, await r.text()

            async def reported() -> bool:
                return sc.index.blocks_of(warm) > 0

            await wait_until(reported, 20, "vLLM's KV events in the index")
            tok = HFPromptTokenizer(str(real_fleet.model))
            ids = tok.token_ids(orjson.loads(first), chat=True)
            assert ids is not None
            keys = block_hashes(ids, 32)
            assert keys and all(sc.index.holds(warm, k) for k in keys)  # our keys = the ones vLLM published

            placed = []
            for i in range(4):
                async with s.post(f"http://127.0.0.1:{envoy.listen_port}/v1/chat/completions",
                                  data=chat(f"Where is book {i}?"), headers=JSON) as r:
                    body = await r.read()
                    assert r.status == 200, body
                    placed.append(r.headers["x-epp-endpoint"])
                    cached = orjson.loads(body)["usage"]["prompt_tokens_details"]["cached_tokens"]
                    assert cached > 0
            assert placed == [warm] * 4
            t = sc.tracker.totals
            assert t.samples == 4 and t.agreed_tokens == t.predicted_tokens == t.actual_tokens > 0

            # A stream whose client did not ask for usage: epp asks, reads it, and strips it.
            async with s.post(f"http://127.0.0.1:{envoy.listen_port}/v1/chat/completions",
                              data=chat("Stream it", stream=True), headers=JSON) as r:
                data = await r.read()
                assert r.status == 200
            assert b'"usage"' not in data and data.endswith(b"data: [DONE]\n\n")
            assert sc.tracker.totals.samples == 5

            # The server drops its cache: the index follows. vLLM publishes AllBlocksCleared with its
            # next engine step, so make it step with an unrelated request.
            async with s.post(f"http://{warm}/reset_prefix_cache") as r:
                assert r.status == 200
            async with s.post(f"http://{warm}/v1/completions", headers=JSON, data=orjson.dumps(
                    {"model": "tiny", "prompt": "unrelated " * 40, "max_tokens": 2, "ignore_eos": True})) as r:
                assert r.status == 200

            async def cleared() -> bool:
                return not any(sc.index.holds(warm, k) for k in keys)

            await wait_until(cleared, 20, "the index to drop the reset server's blocks")
            result = {"samples": sc.tracker.totals.samples, "precision": sc.tracker.precision,
                      "predicted_tokens": sc.tracker.totals.predicted_tokens,
                      "reported_tokens": sc.tracker.totals.actual_tokens,
                      "kv_batches": picker.kv_events.totals().batches}
            print("\nreal vLLM routing precision: " + json.dumps(result), file=sys.stderr)
            assert sc.tracker.precision == 1.0
    finally:
        if envoy is not None:
            envoy.stop()
        await picker.stop(grace=0.2)


def test_a_real_server_sees_the_injected_usage_option(real_fleet: RealFleet) -> None:
    """vLLM honours stream_options.include_usage with cached_tokens (what the closed loop reads)."""
    body = json.loads(chat("usage please", stream=True, stream_options={"include_usage": True}))
    req = urllib.request.Request(f"http://{real_fleet.addresses[0]}/v1/chat/completions",
                                 data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read().decode()
    usage_events = [json.loads(line[6:]) for line in text.splitlines()
                    if line.startswith("data: {") and '"usage"' in line]
    assert len(usage_events) == 1 and usage_events[0]["choices"] == []
    assert "cached_tokens" in usage_events[0]["usage"]["prompt_tokens_details"]
