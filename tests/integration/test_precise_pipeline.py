"""The reference's split precise pipeline through a real Envoy: token-producer (the pods' own
render API) -> precise-prefix-cache-producer (KV events on one shared socket epp binds, the
pod named in the topic) -> prefix-cache-scorer."""

from __future__ import annotations

import aiohttp
import orjson

from epp.scheduling.precise_producer import PrecisePrefixProducer
from epp.sim.kvevents import KVEventsConfig
from epp.stack.local import Stack, free_ports, in_process_stack, wait_until

from .conftest import post

SYSTEM = "You answer questions about trains, briefly, and name the line you mean in each answer. " * 8


def config(render: str, kv_port: int, tokens: str = "") -> str:
    tokens = tokens or f"  parameters: {{modelName: sim-model, vllm: {{url: 'http://{render}'}}}}"
    return f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
{tokens}
- type: endpoint-notification-source
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSizeTokens: 16}}
    kvEventsConfig: {{zmqEndpoint: 'tcp://127.0.0.1:{kv_port}', discoverPods: false}}
    indexerConfig: {{kvBlockIndexConfig: {{enableMetrics: true}}}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: queue-scorer
- type: max-score-picker
dataLayer:
  sources:
  - pluginRef: endpoint-notification-source
    extractors: [{{pluginRef: precise-prefix-cache-producer}}]
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer, weight: 10}}
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: max-score-picker}}
"""


def chat(question: str) -> bytes:
    return orjson.dumps({"model": "sim-model", "max_tokens": 3, "ignore_eos": True,
                         "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})


def producer(stack: Stack) -> PrecisePrefixProducer:
    assert stack.picker is not None
    return next(p for p in stack.picker.director.scheduler.plugins() if isinstance(p, PrecisePrefixProducer))


async def test_the_pods_render_the_prompt_and_their_kv_events_route_it() -> None:
    ports = free_ports(4)
    kv_port = free_ports(1)[0]
    kv = KVEventsConfig(True, "zmq", f"tcp://127.0.0.1:{kv_port}", topic="kv@127.0.0.1:{port}@sim-model")
    async with in_process_stack(servers=3, ports=ports[:3], kv_events=kv,
                                config_text=config(f"127.0.0.1:{ports[0]}", kv_port)) as stack, \
            aiohttp.ClientSession() as s:
        prod = producer(stack)
        warm = stack.addresses[2]
        async def reported() -> bool:
            return prod.index.blocks_of(warm) > 0

        # Another client talks to the pod directly: epp never saw this prompt; the pod reports it. A
        # publisher drops what it sends before epp's subscription reaches it (the pods connect to
        # the shared socket as epp starts): then the pod's cache is reset and the prompt sent again.
        for attempt in range(5):
            status, _, _ = await post(s, f"http://{warm}/v1/chat/completions", chat("which line goes north?"),
                                      headers={"content-type": "application/json"})
            assert status == 200
            try:
                await wait_until(reported, 2, "the pod's KV events on the shared socket")
                break
            except TimeoutError:
                if attempt == 4:
                    raise
                async with s.post(f"http://{warm}/reset_prefix_cache") as r:
                    assert r.status == 200
        served = []
        for i in range(6):
            status, headers, _ = await post(s, f"{stack.url}/v1/chat/completions", chat(f"question {i}"))
            assert status == 200
            served.append(headers["x-sim-server"])
        assert served == [warm] * 6
        assert prod.used["precise"] == 6
        render = stack.fleet.servers[0]
        assert render.render_calls == 6  # each prompt rendered once by the pod's own template
        assert stack.picker is not None
        async with s.get(f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}/metrics") as r:
            text = await r.text()
        assert 'epp_token_producer_requests_total{name="default",plugin="token-producer",result="rendered"} 6.0' \
            in text
        assert "llm_d_epp_kv_cache_index_lookup_requests_total 6.0" in text
        assert 'epp_prefix_match_source_total{index="precise",name="default",plugin="precise-prefix-cache-producer"}' \
            in text


async def test_a_render_server_that_is_down_costs_the_precise_match_not_the_request() -> None:
    ports = free_ports(3)
    kv_port = free_ports(1)[0]
    down = free_ports(1)[0]
    kv = KVEventsConfig(True, "zmq", f"tcp://127.0.0.1:{kv_port}", topic="kv@127.0.0.1:{port}@sim-model")
    async with in_process_stack(servers=2, ports=ports[:2], kv_events=kv,
                                config_text=config(f"127.0.0.1:{down}", kv_port)) as stack, \
            aiohttp.ClientSession() as s:
        for i in range(4):
            status, _, body = await post(s, f"{stack.url}/v1/chat/completions", chat(f"q {i}"))
            assert status == 200 and orjson.loads(body)["choices"]
        prod = producer(stack)
        assert prod.used == {"precise": 0, "approximate": 4}
